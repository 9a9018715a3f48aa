import os

# No GPU in CI: Triton kernels run through the interpreter. Must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
