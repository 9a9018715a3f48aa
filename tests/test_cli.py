"""The `lora-triton` dispatcher: subcommands load lazily, errors are clear, import stays light."""

import subprocess
import sys

from lora_triton import cli


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("demo", "bench", "kernels"):
        assert name in out


def test_no_command_is_a_usage_error(capsys):
    assert cli.main([]) == 2
    assert "usage: lora-triton" in capsys.readouterr().out


def test_unknown_command(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_subcommand_help_reaches_the_subcommand():
    res = subprocess.run([sys.executable, "-m", "lora_triton", "bench", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "--suite" in res.stdout


def test_import_touches_neither_triton_nor_transformers():
    code = ("import sys, lora_triton; "
            "print(sorted(m for m in ('triton', 'transformers', 'peft', 'matplotlib') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_version_names_the_package_and_imports_no_triton():
    code = ("import sys; from lora_triton import cli; sys.exit(cli.main(['--version']) or "
            "('triton' in sys.modules) * 3)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    import lora_triton

    assert res.stdout.startswith(f"lora-triton {lora_triton.__version__} (torch ")
