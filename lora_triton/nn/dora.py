"""DoRA as a LoRA variant (``nn/variants.py``): the magnitude vector, the cached row norm, merge.

The magnitude m of adapter ``name`` is ``layer.lora_magnitude_vector[name].weight`` [out] (PEFT's
in-memory name; on disk ``...lora_magnitude_vector``), initialised to ||W + s B A||_row in fp32
(Embedding, Conv and 4-bit bases: the subclasses in ``nn/dora_layers.py``, PEFT's shapes).
The norm n = ||W + s B A||_row comes from ``ops.dora.dora_weight_norm`` (factored, never [out, in])
and is cached: ||W||^2 per frozen weight, keyed on the identity of the tensor owning its storage
(a transposed / flattened view is rebuilt every call) and its version counter
(bumped by merge, load, any in-place write), and n keyed on A's and B's identity and version
counters and the scaling, so gradient accumulation pays the norm once per optimizer step.
Under ``torch.compile`` nothing is cached (the norm is traced as an op).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.dora import dora_linear, dora_weight_norm, dora_weight_sq
from ..ops.lora_linear import lora_linear
from .variants import LoraVariant


class DoraMagnitude(nn.Module):
    """Holds ``weight`` so the parameter is named ``lora_magnitude_vector.<adapter>.weight``, as in PEFT:
    [out] on Linear layers, [dim] on embeddings, [1, out, 1, ...] on convs (PEFT's shapes)."""

    def __init__(self, shape, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(shape, device=device, dtype=dtype))


def _tensor_key(t: torch.Tensor) -> tuple:
    # A view (Conv1D's W^T, an embedding's E^T, a conv kernel flattened) is rebuilt on every call: key on the
    # tensor that owns the storage; the version counter is shared with its views.
    owner = t if t._base is None else t._base
    return (id(owner), t._version, t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device)


def dora_onto(result: torch.Tensor, base: torch.Tensor, lora: torch.Tensor, g: torch.Tensor,
              gm1: torch.Tensor) -> torch.Tensor:
    """PEFT's DoRA step onto an accumulated ``result``: result + (g - 1) base + g lora (g, g - 1 broadcast)."""
    return result + gm1 * base + g * lora


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

    def factors(self, layer, name: str) -> tuple:
        """(W [N, K], A [r, K], B [N, r], s) whose row norm ||W + s B A|| is DoRA's n (layer types override)."""
        return layer.base_weight(), layer.lora_A[name].weight, layer.lora_B[name].weight, float(layer.scaling[name])

    def magnitude_shape(self, layer) -> tuple:
        return (layer.out_features,)

    def compute_norm(self, layer, weight, a, b, scaling: float) -> torch.Tensor:
        return dora_weight_norm(weight, a, b, scaling, self.weight_sq(weight))

    def weight_norm(self, layer, name: str) -> torch.Tensor:
        """n = ||W + s B A||_row (float32 [N], detached) for the layer's current unmerged weight."""
        weight, a, b, scaling = self.factors(layer, name)
        if torch.compiler.is_compiling():
            return self.compute_norm(layer, weight, a, b, scaling)
        key = (_tensor_key(weight), _tensor_key(a), _tensor_key(b), scaling)
        if self._norm is None or self._norm[0] != key:
            self.norm_computations += 1
            self._norm = (key, self.compute_norm(layer, weight, a, b, scaling))
        return self._norm[1]

    def scales(self, layer, name: str, dtype: torch.dtype, shape=(-1,)) -> tuple[torch.Tensor, torch.Tensor]:
        """(g, g - 1) = (m / n, (m - n) / n) in ``dtype``, viewed as ``shape``; differentiable in m only."""
        m = layer.lora_magnitude_vector[name].weight.reshape(-1).float()
        n = self.weight_norm(layer, name)
        return (m / n).to(dtype).view(shape), ((m - n) / n).to(dtype).view(shape)

    # -- LoraVariant ------------------------------------------------------------------------------
    def init(self, layer, name: str) -> None:
        if name not in layer.lora_magnitude_vector:
            w = self.factors(layer, name)[1]
            layer.lora_magnitude_vector[name] = DoraMagnitude(self.magnitude_shape(layer), device=w.device,
                                                              dtype=w.dtype)
        with torch.no_grad():
            target = layer.lora_magnitude_vector[name].weight
            target.copy_(self.weight_norm(layer, name).view(target.shape))

    def forward(self, layer, name, x, weight, bias, dropout_p):
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        m = layer.lora_magnitude_vector[name].weight
        return dora_linear(x, weight, bias, a, b, m, layer.scaling[name], dropout_p,
                           weight_norm=self.weight_norm(layer, name))

    def forward_onto(self, layer, name, x, result, weight, bias, dropout_p):
        """After other adapters, PEFT's form: at p = 0 (or eval) DoRA rescales everything before it,
        result + (g - 1)(result - b) + g s B A x; with dropout result + (g - 1) W D(x) + g s B A D(x), D drawn
        from torch's generator like PEFT's nn.Dropout. Composed from ops (autograd through them)."""
        return self.onto(layer, name, x, result, bias, dropout_p, lambda h: F.linear(h, weight))

    def onto(self, layer, name, x, result, bias, dropout_p, base_fn):
        g, gm1 = self.scales(layer, name, result.dtype)
        if dropout_p == 0.0:
            h, base = x, (result if bias is None else result - bias)
        else:
            h = F.dropout(x, dropout_p, training=True)
            base = base_fn(h)
        lora = lora_linear(h, None, None, layer.lora_A[name].weight, layer.lora_B[name].weight,
                           layer.scaling[name], 0.0)
        return dora_onto(result, base, lora, g, gm1)

    # -- merging: one implementation for every layer type; the hooks below give each type's layout ------
    @staticmethod
    def flat(weight: torch.Tensor) -> torch.Tensor:
        """A weight in the layer's layout as [N, K], the rows DoRA's norm runs over (dense: already)."""
        return weight

    @staticmethod
    def factor_view(weight: torch.Tensor) -> tuple:
        """The shape g = m / n takes to scale a weight in the layer's layout (dense: one factor per row)."""
        return (-1, 1)

    def merge_delta(self, layer, name: str) -> torch.Tensor:
        """s B A in the merge precision, in the layout merges fold into (dense: fp32 [out, in])."""
        a = layer.lora_A[name].weight.detach().float()
        b = layer.lora_B[name].weight.detach().float()
        return (b @ a) * layer.scaling[name]

    def stored_base(self, layer) -> torch.Tensor:
        """The base weight as stored now (detached), in the layout of ``merge_delta``."""
        return layer.base_weight().detach()

    def unmerged_base(self, layer) -> torch.Tensor:
        """The base weight in the merge precision with the merged adapters taken out, last merged first."""
        return layer.unmerged_weight_fp32()

    def _factor(self, layer, name: str, weight: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        """g = m / norm in ``weight``'s dtype, viewed to scale ``weight``."""
        m = layer.lora_magnitude_vector[name].weight.detach().reshape(-1).to(weight.dtype)
        return (m / norm).view(self.factor_view(weight))

    def merge_norm(self, layer, name: str) -> torch.Tensor:
        """n for a merge (PEFT): from the base weight with earlier merges taken out, as the forward does."""
        if not layer.merged_adapters:
            return self.weight_norm(layer, name)
        _, a, b, scaling = self.factors(layer, name)
        return dora_weight_norm(self.flat(self.unmerged_base(layer)), a.detach().float(), b.detach().float(),
                                scaling)

    def merge_weight(self, layer, name, weight):
        # PEFT: n from the unmerged base weight, the factor applied to the weight as it is now.
        norm = self.merge_norm(layer, name)
        self.merged_norm = norm.clone()
        return self._factor(layer, name, weight, norm) * (weight + self.merge_delta(layer, name))

    def unmerge_weight(self, layer, name, weight):
        if self.merged_norm is None:
            raise RuntimeError(f"DoRA adapter {name!r} has no recorded merge norm; it was not merged by this layer")
        factor = self._factor(layer, name, weight, self.merged_norm)
        if not bool((factor != 0).all()):
            raise ValueError(f"cannot unmerge DoRA adapter {name!r}: its magnitude is zero in some rows, so the "
                             "merged weight lost those rows")
        return weight / factor - self.merge_delta(layer, name)

    def weight_change(self, layer, name: str, delta: torch.Tensor) -> torch.Tensor:
        """The whole change the adapter makes (its eval forward) in the base weight's layout and ``delta``'s
        dtype, ``delta`` = s B A: g (W + dW) - W, g = m / ||W + dW|| over the norm's rows, W with the merged
        adapters taken out (weighted merging, ``nn/merge_views.py``)."""
        w = (self.unmerged_base(layer) if layer.merged_adapters else self.stored_base(layer)).to(delta.dtype)
        directed = w + delta
        return self._factor(layer, name, directed, self.flat(directed).norm(dim=1)) * directed - w

    def delete(self, layer, name: str) -> None:
        if name in layer.lora_magnitude_vector:
            del layer.lora_magnitude_vector[name]
