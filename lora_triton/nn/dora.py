"""DoRA as a LoRA variant (``nn/variants.py``): the magnitude vector, the cached row norm, merge.

The magnitude m of adapter ``name`` is ``layer.lora_magnitude_vector[name].weight`` [out] (PEFT's
in-memory name; on disk ``...lora_magnitude_vector``), initialised to ||W + s B A||_row in fp32.
The norm n = ||W + s B A||_row comes from ``ops.dora.dora_weight_norm`` (factored, never [out, in])
and is cached: ||W||^2 per frozen weight, keyed on the weight's identity and version counter
(bumped by merge, load, any in-place write), and n keyed on A's and B's identity and version
counters and the scaling, so gradient accumulation pays the norm once per optimizer step.
Under ``torch.compile`` nothing is cached (the norm is traced as an op).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops.dora import dora_linear, dora_weight_norm, dora_weight_sq
from .variants import LoraVariant


class DoraMagnitude(nn.Module):
    """Holds ``weight`` [out] so the parameter is named ``lora_magnitude_vector.<adapter>.weight``, as in PEFT."""

    def __init__(self, out_features: int, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(out_features, device=device, dtype=dtype))


def _tensor_key(t: torch.Tensor) -> tuple:
    return (id(t), t._version, t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device)


class DoraVariant(LoraVariant):
    kind = "dora"

    def __init__(self):
        self._sq: Optional[tuple] = None  # (key of the base weight, ||W||^2 [out] fp32)
        self._norm: Optional[tuple] = None  # (key of W, A, B, scaling, n [out] fp32)
        self.merged_norm: Optional[torch.Tensor] = None  # n used by the last merge (unmerge divides by m / n)
        self.norm_computations = 0  # how often n was computed (tests, diagnostics)

    # -- the norm ---------------------------------------------------------------------------------
    def weight_sq(self, weight: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return dora_weight_sq(weight)
        key = _tensor_key(weight)
        if self._sq is None or self._sq[0] != key:
            self._sq = (key, dora_weight_sq(weight))
        return self._sq[1]

    def weight_norm(self, layer, name: str) -> torch.Tensor:
        """n = ||W + s B A||_row (float32 [out], detached) for the layer's current unmerged weight."""
        weight, a, b = layer.base_weight(), layer.lora_A[name].weight, layer.lora_B[name].weight
        scaling = float(layer.scaling[name])
        if torch.compiler.is_compiling():
            return dora_weight_norm(weight, a, b, scaling)
        key = (_tensor_key(weight), _tensor_key(a), _tensor_key(b), scaling)
        if self._norm is None or self._norm[0] != key:
            self.norm_computations += 1
            self._norm = (key, dora_weight_norm(weight, a, b, scaling, self.weight_sq(weight)))
        return self._norm[1]

    # -- LoraVariant ------------------------------------------------------------------------------
    def init(self, layer, name: str) -> None:
        a = layer.lora_A[name].weight
        if name not in layer.lora_magnitude_vector:
            layer.lora_magnitude_vector[name] = DoraMagnitude(layer.out_features, device=a.device, dtype=a.dtype)
        with torch.no_grad():
            layer.lora_magnitude_vector[name].weight.copy_(self.weight_norm(layer, name))

    def forward(self, layer, name, x, weight, bias, dropout_p):
        if weight is None:
            raise NotImplementedError(
                f"DoRA adapter {name!r} must be the first active adapter of its layer (active: "
                f"{layer.active_adapters}): PEFT scales the output of the adapters before it, which lora_triton "
                "does not reproduce")
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        m = layer.lora_magnitude_vector[name].weight
        return dora_linear(x, weight, bias, a, b, m, layer.scaling[name], dropout_p,
                           weight_norm=self.weight_norm(layer, name))

    def _delta(self, layer, name: str) -> torch.Tensor:
        a = layer.lora_A[name].weight.detach().float()
        b = layer.lora_B[name].weight.detach().float()
        return (b @ a) * layer.scaling[name]

    def merge_weight(self, layer, name, weight):
        # PEFT: n from the unmerged base weight, the factor applied to the weight as it is now.
        if layer.merged_adapters:
            base = layer.unmerged_weight_fp32()
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
            norm = dora_weight_norm(base, a.float(), b.float(), float(layer.scaling[name]))
        else:
            norm = self.weight_norm(layer, name)
        self.merged_norm = norm.clone()
        factor = layer.lora_magnitude_vector[name].weight.detach().float() / norm
        return factor[:, None] * (weight + self._delta(layer, name))

    def unmerge_weight(self, layer, name, weight):
        if self.merged_norm is None:
            raise RuntimeError(f"DoRA adapter {name!r} has no recorded merge norm; it was not merged by this layer")
        factor = layer.lora_magnitude_vector[name].weight.detach().float() / self.merged_norm
        if not bool((factor != 0).all()):
            raise ValueError(f"cannot unmerge DoRA adapter {name!r}: its magnitude is zero in some rows, so the "
                             "merged weight lost those rows")
        return weight / factor[:, None] - self._delta(layer, name)

    def delete(self, layer, name: str) -> None:
        if name in layer.lora_magnitude_vector:
            del layer.lora_magnitude_vector[name]
