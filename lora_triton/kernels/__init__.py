"""Triton kernels. Nothing here imports triton at package import: the op layer imports
``lora_triton.kernels.lora_linear`` (and friends) lazily, only when the triton backend runs.

Modules: ``lora_fwd`` / ``lora_bwd`` (kernels), ``lora_linear`` (launchers, same signatures as
``lora_triton.reference.lora_linear``), ``autotune`` (configs, pruner), ``aot_report``
(ahead-of-time compile report behind ``lora-triton kernels``).
"""
