"""Grouping of sibling LoRA projections that read the same input (q/k/v, gate/up).

``inject_lora`` installs it on every model it touches; ``ungroup_siblings(model)`` removes it.

A ``LoraLinear`` cannot see its siblings, so grouping is installed at model level:
``group_siblings(model)`` finds sibling ``LoraLinear`` children of one parent whose names form a
known group and gives each member a grouped forward. The first member called with a tensor x
runs ``lora_linear_grouped`` for every member that is eligible (see ``_eligible``) and caches
the others' outputs keyed on x's identity; a member called with *the very same tensor object*
(same id, same version counter, same data pointer, shape and strides) and its own state unchanged
(the others' states do not enter its output) takes its cached output; any other input falls back to
the layer's own forward or a new grouped call. Correctness therefore never depends on the model's
structure: outputs are shared only when the inputs provably are.
The cached outputs are outputs of one autograd node, so gradients flow as usual.

Dropout: the grouped call draws one seed per projection from torch's generator, in one draw for
the group; masks are as random as the ungrouped path's but not the same draws (seeded runs give
other masks than without grouping). ``ungroup_siblings(model)`` restores the plain forwards.
Under ``torch.compile`` the members run their plain forward (the identity cache is eager-only).

Where it runs (``LORA_TRITON_GROUP=auto|on|off``, default auto): ``auto`` groups where the grouped op pays,
the Triton backend (one fused shrink launch for the group); on the CPU reference the members run their plain
forwards. Measured there (tiny Llama step, hidden 256, 64 tokens, r=16, fp32, 2026-12-01, docs/benchmarks.md):
ungrouped 6.05 vs grouped 6.60 ms at lora_dropout=0, 8.46 vs 8.57 ms at 0.05: the reference's grouped op runs
the same per-projection GEMMs and masks (the step's masks are batched by ``mask_forecast`` either way) plus
the group's bookkeeping. ``on`` groups on every backend (tests), ``off`` nowhere.
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn

from ..env_vars import env_choice
from ..ops.backend import choose_backend, requested_backend
from ..ops.grouped import lora_linear_grouped
from .lora_bias import with_lora_bias
from .lora_linear import LoraLinear
from .nf4_linear import NF4Linear

DEFAULT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"))
_ATTR = "_lora_sibling_group"
_POLICIES = ("auto", "on", "off")


def grouping_policy() -> str:
    """``LORA_TRITON_GROUP`` (auto, on, off; default auto); another value is an error naming the valid ones.
    Every grouped member's call asks: read as ``LORA_TRITON_BACKEND`` is (``env_vars.env_choice``, parse cached)."""
    return env_choice("LORA_TRITON_GROUP", _POLICIES)


def grouping_pays(device: torch.device) -> bool:
    """Whether sibling grouping runs for inputs on ``device`` (module docstring: by measurement). On CPU the
    Triton backend runs only when asked for by name (``choose_backend``), so that is one environment read."""
    policy = grouping_policy()
    if policy != "auto":
        return policy == "on"
    if device.type == "cpu":
        return requested_backend() == "triton"
    return choose_backend(device) == "triton"


class SiblingGroup:
    """The members of one group and the cache of outputs computed for the last shared input."""

    def __init__(self, names: Sequence[str], layers: Sequence[LoraLinear]):
        self.names = list(names)
        self.layers = list(layers)
        self._x = None  # the input the cache is for (held, so its id cannot be reused meanwhile)
        self._key = None
        self._outputs: dict[int, tuple[torch.Tensor, tuple]] = {}  # member -> (output, its state then)
        self.grouped_calls = 0  # how many times the grouped op ran (tests, diagnostics)
        self.cache_hits = 0
        # Siblings that do not share their input (cross-attention: q reads the decoder, k/v the
        # encoder) would make every grouped call compute outputs nobody takes. After
        # MAX_WASTED such calls the group stands down and its members run their plain forwards.
        self.wasted = 0
        self.enabled = True

    MAX_WASTED = 2

    def clear(self) -> None:
        self._x, self._key, self._outputs = None, None, {}

    @staticmethod
    def _key_of(x: torch.Tensor) -> tuple:
        return (id(x), x._version, x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype, x.device,
                torch.is_grad_enabled())

    def forward(self, layer: LoraLinear, x: torch.Tensor, args, kwargs):
        # Inference tensors have no version counter: an in-place change between the siblings'
        # calls could not be detected, so they take the plain forward. The policy is read last: the
        # cheap checks first, and nothing for a compiler to trace where the plain forward runs anyway.
        if (not self.enabled or args or kwargs or torch.compiler.is_compiling() or x.is_inference()
                or not grouping_pays(x.device)):
            return LoraLinear.forward(layer, x, *args, **kwargs)
        state = _state(layer, x)
        if state is None:
            return LoraLinear.forward(layer, x)
        idx = next(i for i, m in enumerate(self.layers) if m is layer)
        key = self._key_of(x)
        cached = self._outputs.get(idx) if self._x is x and self._key == key else None
        # A member's output depends on x and its own state only: both unchanged since the grouped call
        # means the cached output is exactly what its own forward would compute.
        if cached is not None and cached[1] == state:
            self.cache_hits += 1
            del self._outputs[idx]
            if not self._outputs:
                self.clear()
            return cached[0]
        states = [state if i == idx else _state(m, x) for i, m in enumerate(self.layers)]
        members = [i for i, s in enumerate(states) if s is not None]
        if self._outputs:  # the previous grouped call's outputs were never taken
            self.wasted += 1
            if self.wasted >= self.MAX_WASTED:
                self.enabled = False
        if len(members) < 2 or not self.enabled:
            self.clear()
            return LoraLinear.forward(layer, x)
        outs = _grouped_forward([self.layers[i] for i in members], x)
        self.grouped_calls += 1
        self._x, self._key = x, key
        self._outputs = {i: (o, states[i]) for i, o in zip(members, outs) if i != idx}
        return outs[members.index(idx)]


def _state(layer: LoraLinear, x: torch.Tensor) -> Optional[tuple]:
    """What the layer's output depends on besides x and its frozen weight, or None when the layer
    is not eligible for grouping: a mixed batch, adapters disabled or merged, not exactly one
    active adapter, autocast, or a dtype / width mismatch (the plain forward handles those)."""
    if layer.mixed_batch is not None or layer.disable_adapters or layer.merged_adapters:
        return None
    active = layer.active_adapters
    if len(active) != 1 or torch.is_autocast_enabled(x.device.type):
        return None
    base = layer.base_layer
    if isinstance(base, NF4Linear):  # its own fused 4-bit GEMM; grouping would dequantize W
        return None
    name = active[0]
    if name in layer.lora_variant:  # variants (DoRA) run their own forward
        return None
    lora_a, lora_b = layer.lora_A, layer.lora_B
    if name not in lora_a:
        return None
    weight = base.weight  # [out, in] or Conv1D's [in, out]: dtype, device and version are the same
    if x.dtype != weight.dtype or x.device != weight.device or x.shape[-1] != layer.in_features:
        return None
    p = layer.lora_dropout_p[name] if layer.training else 0.0
    return (name, layer.scaling[name], p, lora_a[name].weight._version, lora_b[name].weight._version,
            weight._version)


def _grouped_forward(layers: Sequence[LoraLinear], x: torch.Tensor):
    weights, biases, lora_As, lora_Bs, scalings, ps = [], [], [], [], [], []
    for layer in layers:
        name = layer.active_adapters[0]
        scale = layer.scaling[name]
        lora_b = layer.lora_B[name]
        weights.append(layer.base_weight())
        biases.append(with_lora_bias(layer, name, layer.base_bias(), x.dtype))
        lora_As.append(layer.lora_A[name].weight)
        lora_Bs.append(lora_b.weight)
        scalings.append(scale)
        ps.append(layer.lora_dropout_p[name] if layer.training else 0.0)
    return lora_linear_grouped(x, weights, biases, lora_As, lora_Bs, scalings, ps)


def _grouped_layer_forward(self: LoraLinear, x: torch.Tensor, *args, **kwargs):
    return getattr(self, _ATTR).forward(self, x, args, kwargs)


def group_siblings(model: nn.Module, groups: Optional[Sequence[Sequence[str]]] = None) -> list[SiblingGroup]:
    """Install grouped forwards on sibling LoraLinear layers named as in ``groups`` (default:
    q/k/v, gate/up, query/key/value). A group needs at least two members under one parent.
    Returns the groups created; calling it again first removes the previous grouping."""
    ungroup_siblings(model)
    groups = [tuple(g) for g in (DEFAULT_GROUPS if groups is None else groups)]
    created = []
    for parent in model.modules():
        children = dict(parent.named_children())
        for names in groups:
            found = [(n, children[n]) for n in names if isinstance(children.get(n), LoraLinear)]
            if len(found) < 2 or any(hasattr(m, _ATTR) for _, m in found):
                continue
            group = SiblingGroup([n for n, _ in found], [m for _, m in found])
            for _, m in found:
                setattr(m, _ATTR, group)  # a plain attribute: not a submodule, not in state_dict
                m.forward = types.MethodType(_grouped_layer_forward, m)
            created.append(group)
    return created


def ungroup_siblings(model: nn.Module) -> int:
    """Remove what ``group_siblings`` installed; returns how many layers were restored."""
    count = 0
    for m in model.modules():
        if isinstance(m, LoraLinear) and hasattr(m, _ATTR):
            getattr(m, _ATTR).clear()
            delattr(m, _ATTR)
            m.__dict__.pop("forward", None)
            count += 1
    return count
