"""``lora-triton demo | bench | kernels``: each subcommand lives in its own module, loaded on use."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": ("lora_triton.demo.run", "train two adapters on a small model, save, reload, verify (CPU, offline)"),
    "bench": ("lora_triton.benchmark.cli", "benchmark our kernels vs unfused PyTorch, PEFT and the base layer"),
    "bench-peft": ("lora_triton.benchmark.peft_patch_cases", "a PEFT training step, plain vs patch_peft (tiny Llama, a "
                   "4096-wide layer)"),
    "kernels": ("lora_triton.kernels.aot_report",
                "compile every kernel ahead of time for sm_80/sm_90/sm_100 and report"),
}

USAGE = "usage: lora-triton [--version] {demo,bench,bench-peft,kernels} [options] (COMMAND --help: its options)\n\n" + \
    "\n".join(f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items())


def version() -> str:
    """``lora-triton X (torch Y, triton Z)``, read from package metadata: triton is never imported."""
    from importlib import metadata

    from . import __version__

    def installed(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return f"lora-triton {__version__} (torch {installed('torch')}, triton {installed('triton')})"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-V", "--version"):
        print(version())
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"lora-triton: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
