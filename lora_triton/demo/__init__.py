"""``lora-triton demo``: two LoRA adapters trained, saved in PEFT format and reloaded, offline on CPU.

Run it with ``lora-triton demo`` or ``python -m lora_triton demo``; the entry point is
``lora_triton.demo.run.main(argv) -> int``. Importing this package imports neither transformers
nor the demo's model code.
"""


def main(argv=None) -> int:
    from .run import main as _main

    return _main(argv)


__all__ = ["main"]
