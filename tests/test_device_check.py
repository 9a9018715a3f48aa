"""bench/device_check.sh and its Python steps, without a GPU: the dry run lists every step with a budget that
sums under 8 minutes, a missing script or option fails its step (and the budget guard skips steps), every
script's --help works on CPU, and the check scripts run end to end on tiny shapes through the interpreter."""

import json
import os
import runpy
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "device_check.sh"
STEPS = ["env", "preflight", "kernels", "serving", "paths", "dora", "nf4", "kinds", "bench"]
OWN_STEPS = ["env", "kernels", "serving", "paths", "bench"]  # scripts of this track and the harness


def _run(*args, repo_script=SCRIPT, env=None, timeout=120):
    return subprocess.run(["bash", str(repo_script), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})})


def _dry_table(stdout: str) -> dict:
    """step -> (budget, status) from the dry run's table."""
    rows = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] in STEPS and parts[1].endswith("s") and parts[1][:-1].isdigit():
            rows[parts[0]] = (int(parts[1][:-1]), parts[2])
    return rows


def test_dry_run_lists_every_step_with_budgets_under_8_minutes(tmp_path):
    res = _run("--dry-run", str(tmp_path / "out"))
    assert res.returncode in (0, 3), res.stderr
    table = _dry_table(res.stdout)
    assert list(table) == STEPS
    total = sum(b for b, _ in table.values())
    assert total < 480 and f"total budget {total}s" in res.stdout
    # This checkout's own steps are wired; the others' readiness decides the exit status.
    assert all(table[s][1] == "ready" for s in OWN_STEPS), res.stdout
    missing = [s for s, (_, st) in table.items() if st == "MISSING"]
    assert (res.returncode == 3) == bool(missing) and res.stdout.count("would fail before starting") == len(missing)
    assert "--suite all --device cuda" in res.stdout and str(tmp_path / "out") + "/bench.json" in res.stdout
    assert "device_check_dora.py --quick" in res.stdout and "device_check_nf4.py --quick" in res.stdout
    assert "kinds_bench --device cuda --quick" in res.stdout
    assert "PYTHONPATH=" + str(REPO) in res.stdout and "LORA_TRITON_AUTOTUNE=0" in res.stdout
    assert not (tmp_path / "out").exists()  # dry mode creates nothing


def test_argument_errors():
    assert _run("--bogus").returncode == 2
    assert _run("--dry-run", "a", "b").returncode == 2
    assert _run(env={"DRY_RUN": "yes"}).returncode == 2
    assert "OUTDIR" in _run("--help").stdout


STUB = textwrap.dedent("""\
    import argparse, sys, time
    ap = argparse.ArgumentParser()
    for opt in {opts!r}:
        ap.add_argument(opt)
    ap.add_argument("--quick", action="store_true") if {quick!r} else None
    args, _ = ap.parse_known_args()
    time.sleep({sleep!r})
    print("stub ran", sys.argv[1:])
    sys.exit({rc!r})
""")


def _fake_repo(root: Path, *, dora=True, nf4_quick=True, serving_rc=1) -> Path:
    """A checkout whose steps are stubs: the shell script's logic without torch or a GPU."""
    (root / "bench").mkdir(parents=True)
    shutil.copy(SCRIPT, root / "bench" / "device_check.sh")
    (root / "lora_triton" / "benchmark").mkdir(parents=True)
    for init in ("lora_triton/__init__.py", "lora_triton/benchmark/__init__.py"):
        (root / init).write_text("")

    def stub(rel, opts=("--out", "--budget", "--jobs"), quick=True, sleep=0, rc=0):
        (root / rel).write_text(STUB.format(opts=list(opts), quick=quick, sleep=sleep, rc=rc))

    (root / "bench" / "_device_common.py").write_text("print('env stub')\n")
    stub("bench/device_check_kernels.py")
    stub("bench/device_check_serving.py", rc=serving_rc)
    stub("bench/device_check_paths.py", sleep=30)
    if dora:
        stub("bench/device_check_dora.py", opts=("--out", "--budget"))
    stub("bench/device_check_nf4.py", opts=("--out", "--budget"), quick=nf4_quick)
    stub("lora_triton/benchmark/kinds_bench.py", opts=("--device", "--json"))
    stub("lora_triton/benchmark/cli.py", opts=("--suite", "--device", "--time-budget", "--json", "--plot"))
    return root / "bench" / "device_check.sh"


def test_missing_script_or_option_fails_its_step_and_the_guard_skips(tmp_path):
    script = _fake_repo(tmp_path / "repo", dora=False, nf4_quick=False)
    env = {"ENV_TIMEOUT": "10", "KERNELS_TIMEOUT": "10", "SERVING_TIMEOUT": "10", "PATHS_TIMEOUT": "1",
           "KINDS_TIMEOUT": "100", "DEVICE_CHECK_GUARD": "40", "PYTHONPATH": ""}
    dry = _run("--dry-run", str(tmp_path / "dry"), repo_script=script, env=env)
    assert dry.returncode == 3, dry.stdout + dry.stderr
    assert "script missing: bench/device_check_dora.py" in dry.stdout
    assert "bench/device_check_nf4.py has no --quick option" in dry.stdout

    out = tmp_path / "out"
    res = _run(str(out), repo_script=script, env=env)
    doc = json.loads((out / "device_check.json").read_text())
    status = {s["step"]: s["status"] for s in doc["steps"]}
    assert status == {"env": "ok", "preflight": "FAIL", "kernels": "ok", "serving": "FAIL", "paths": "TIMEOUT",
                      "dora": "MISSING", "nf4": "MISSING", "kinds": "SKIPPED", "bench": "SKIPPED"}, res.stdout
    assert res.returncode == 3 and doc["exit"] == 3  # the first failing step: the preflight
    assert "[kinds] skipped: 100 s budget" in res.stdout
    table = res.stdout[res.stdout.rindex("step       status"):]
    assert all(s in table for s in STEPS) and "exit 3" in table  # the table comes last
    assert "stub ran" in (out / "kernels.log").read_text() and (out / "paths.log").is_file()
    assert not (out / "dora.log").exists()  # a missing script is never started

    ready = _fake_repo(tmp_path / "ready", serving_rc=0)
    assert _run("--dry-run", str(tmp_path / "d2"), repo_script=ready, env=env).returncode == 0


@pytest.mark.parametrize("name", ["device_check_kernels", "device_check_serving", "device_check_paths",
                                  "device_check_dora", "device_check_nf4", "compile_count"])
def test_script_help_works_on_cpu(name):
    res = subprocess.run([sys.executable, str(REPO / "bench" / f"{name}.py"), "--help"],
                         capture_output=True, text=True, timeout=60, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert res.returncode == 0 and "usage:" in res.stdout, res.stderr


def _main(name):
    return runpy.run_path(str(REPO / "bench" / f"device_check_{name}.py"), run_name=f"device_check_{name}")["main"]


@pytest.fixture
def interp(monkeypatch, tmp_path):
    for key, value in (("TRITON_INTERPRET", "1"), ("LORA_TRITON_BACKEND", "triton"), ("LORA_TRITON_AUTOTUNE", "0"),
                       ("LORA_TRITON_CACHE_DIR", str(tmp_path / "cache"))):
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("LORA_TRITON_PATH", os.environ.get("LORA_TRITON_PATH", "auto"))


def test_kernel_check_self_test_covers_every_path(tmp_path, interp):
    assert _main("kernels")(["--self-test", "--jobs", "1", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "kernels.json").read_text())
    assert {r["path"] for r in doc["rows"]} == {"fused", "composed", "grouped"}
    assert {kind for r in doc["rows"] for kind in r["gemm"].split("+")} == {"tma", "pointer"}  # both GEMM families
    assert all(r["ok"] for r in doc["rows"]) and doc["self_test"] and doc["device"] == "cpu"


def test_kernel_check_budget_skips_cases(tmp_path, interp):
    assert _main("kernels")(["--self-test", "--jobs", "1", "--budget", "1", "--out", str(tmp_path)]) == 1
    doc = json.loads((tmp_path / "kernels.json").read_text())
    assert doc["rows"] and all(r["ok"] is None for r in doc["rows"])  # nothing ran: not a pass


def test_serving_and_paths_self_tests(tmp_path, interp):
    assert _main("serving")(["--self-test", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "device_check_serving.json").read_text())
    assert len(doc["cases"]) == 3 and all(c["ok"] for c in doc["cases"]) and "distinct8_lora_only_us" in doc["timings"]
    assert _main("paths")(["--self-test", "--quick", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "paths.json").read_text())["rows"]
    # Under the interpreter auto measures nothing and keeps the fused path.
    assert len(rows) == 1 and "peft_fwd_bwd_ms" in rows[0] and rows[0]["auto_fwd"] == "fused"
