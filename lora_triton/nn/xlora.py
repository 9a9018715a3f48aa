"""X-LoRA (Buehler & Buehler, 2024): a mixture of LoRA experts routed per token by a small classifier.

Two passes per model call, as in PEFT: a scaling pass under no_grad with every expert weighted by
``scaling_pass_value``, whose last hidden state feeds the classifier; then the weighted pass with the
classifier's per-token, per-layer expert weights c [batch, seq, n_layers, n_experts].

PEFT multiplies each expert's *input* by its weight, y = base(x) + g sum_i s_i B_i A_i (c_i x). The
expert weight is a per-token scalar, so it commutes with A_i: c_i (x A_i^T) = (c_i x) A_i^T, i.e. weighting
U = x A_i^T is the same function. We therefore run all experts of a layer in **one**
``multi_lora_linear`` call with per-token weights over k slots (k = n dense, k = top_k_lora routed);
``tests/test_xlora.py`` confirms the equality in fp64. The other form of the same sum is two GEMMs over
the concatenated experts (A_cat [sum r, in], per-column weights): it is used when a gradient is needed
(``multi_lora_linear`` is an inference op: training the classifier, trainable experts), and by default
on the PyTorch reference backend (CPU), where it is faster than the reference's grouped gathers;
``weighted_pass="multi_lora"`` / ``"concat"`` force one. With expert dropout in training each expert
gets its own dropout(c_i x), exactly PEFT's loop.

Expert names are kept as given (PEFT 0.21.2 only works with "0".."n-1").
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.multi_lora import multi_lora_linear
from .grouping import ungroup_siblings
from .inject import adapter_configs, delete_adapter, lora_layers, set_adapter
from .lora_linear import LoraLinear
from .transaction import model_transaction
from .xlora_config import XLoraConfig


class XLoraClassifier(nn.Module):
    """PEFT's layout (``layers`` = Linear [-> ReLU -> Dropout ...] -> Linear), so state-dict keys match."""

    def __init__(self, config: XLoraConfig, n_experts: int, n_layers: int, dtype: torch.dtype, device):
        super().__init__()
        self.config, self.n_experts, self.n_layers = config, n_experts, n_layers
        width = n_experts * n_layers if config.layerwise_scalings else n_experts
        kw = dict(dtype=dtype, device=device)
        layers: list[nn.Module] = []
        size = config.hidden_size
        for _ in range(config.xlora_depth - 1):
            layers += [nn.Linear(size, config.xlora_size, **kw), nn.ReLU()]
            if config.xlora_dropout_p > 0:
                layers.append(nn.Dropout(config.xlora_dropout_p))
            size = config.xlora_size
        self.layers = nn.Sequential(*layers, nn.Linear(size, width, **kw))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        b, s = hidden.shape[:2]
        logits = self.layers(hidden)
        if not self.config.layerwise_scalings:
            logits = logits.unsqueeze(2).expand(-1, -1, self.n_layers, -1)
        scalings = logits.reshape(b, s, self.n_layers, self.n_experts)
        if self.config.enable_softmax:
            scalings = torch.softmax(scalings / self.config.softmax_temperature, dim=-1)
        return scalings


class _ExpertStack:
    """One layer's experts stacked for multi_lora_linear (``get``) and concatenated for the two-GEMM form
    (``concat``), each rebuilt only when a parameter changes (inference: once)."""

    def __init__(self, layer: LoraLinear, names: list[str]):
        self.layer, self.names = layer, names
        self._key = self._cat_key = None
        self.tensors = self._cat = None
        self.biased = [n for n in names if layer.lora_B[n].bias is not None]
        ranks = [layer.r[n] for n in names]
        self.equal_rank = ranks[0] if len(set(ranks)) == 1 else None
        self.column_expert = torch.cat([torch.full((r,), i) for i, r in enumerate(ranks)])

    def _params(self):
        """Every expert's A and B weights, in expert order."""
        layer = self.layer
        return (p for n in self.names for p in (layer.lora_A[n].weight, layer.lora_B[n].weight))

    def _version(self):
        """(id, version) of every expert's A and B: the key both caches are rebuilt on."""
        return tuple((id(p), p._version) for p in self._params())

    def trainable(self) -> bool:
        return any(p.requires_grad for p in self._params())

    def concat(self, dtype: torch.dtype):
        """(A_cat [sum r, in], (B s)_cat [out, sum r]) in ``dtype``, no autograd (callers needing gradients
        build them in the graph)."""
        key = (self._version(), dtype)
        if key != self._cat_key:
            layer = self.layer
            with torch.no_grad():
                a_cat = torch.cat([layer.lora_A[m].weight for m in self.names]).to(dtype)
                b_cat = torch.cat([layer.lora_B[m].weight * layer.scaling[m] for m in self.names], dim=1).to(dtype)
            self._cat, self._cat_key = (a_cat, b_cat.t().contiguous()), key
        return self._cat

    def get(self):
        layer = self.layer
        key = self._version()
        if key != self._key:
            first = layer.lora_A[self.names[0]].weight
            with torch.no_grad():
                r_max = max(layer.r[n] for n in self.names)
                a = torch.zeros(len(self.names), r_max, layer.in_features, dtype=first.dtype, device=first.device)
                b = torch.zeros(len(self.names), layer.out_features, r_max, dtype=first.dtype, device=first.device)
                for i, n in enumerate(self.names):
                    a[i, : layer.r[n]] = layer.lora_A[n].weight
                    b[i, :, : layer.r[n]] = layer.lora_B[n].weight
                scal = torch.tensor([layer.scaling[n] for n in self.names], dtype=torch.float32, device=a.device)
                ranks = torch.tensor([layer.r[n] for n in self.names], dtype=torch.int32, device=a.device)
            self.tensors, self._key = (a, b, scal, ranks), key
        return self.tensors


class XLoraModel(nn.Module):
    """``XLoraModel(model, config)``: loads the experts (PEFT LoRA directories) into ``model`` under their
    names and wraps it; call it like the model (``generate`` too: the cache is turned off, as in PEFT)."""

    WEIGHTED_PASSES = ("auto", "multi_lora", "concat")

    def __init__(self, model: nn.Module, config: XLoraConfig, weighted_pass: str = "auto"):
        super().__init__()
        if not isinstance(config, XLoraConfig):
            raise TypeError(f"config must be a lora_triton XLoraConfig, got {type(config).__name__}")
        if weighted_pass not in self.WEIGHTED_PASSES:
            raise ValueError(f"weighted_pass must be one of {self.WEIGHTED_PASSES}, got {weighted_pass!r}")
        self.weighted_pass = weighted_pass
        from ..io.peft_format import load_adapter, read_peft_adapter

        names = config.expert_names
        clash = [n for n in names if n in adapter_configs(model)]
        if clash:
            raise ValueError(f"the model already holds adapters named {clash}")
        for name, path in config.adapters.items():
            expert_config, _ = read_peft_adapter(path, name)
            if expert_config.modules_to_save:
                raise ValueError(f"expert {name!r} ({path}) has modules_to_save={expert_config.modules_to_save}; "
                                 "X-LoRA mixes LoRA layers only")
            if expert_config.use_dora:
                raise ValueError(f"expert {name!r} ({path}) is a DoRA adapter; X-LoRA mixes plain LoRA experts "
                                 "(PEFT refuses DoRA experts too)")
        # All or nothing: an expert that fails to load (or anything after) leaves the model as it was.
        with model_transaction(model):
            for name, path in config.adapters.items():
                load_adapter(model, path, adapter_name=name, is_trainable=config.use_trainable_adapters)
            self._install(model, config, names)

    def _install(self, model: nn.Module, config: XLoraConfig, names: list[str]) -> None:
        set_adapter(model, names)
        if not config.use_trainable_adapters:
            for _, layer in lora_layers(model):
                for n in names:
                    if n in layer.lora_A:
                        layer.lora_A[n].requires_grad_(False)
                        layer.lora_B[n].requires_grad_(False)
        self.model = model
        self.config = config
        self._layers = [layer for _, layer in lora_layers(model) if any(n in layer.lora_A for n in names)]
        self._stacks = [_ExpertStack(layer, [n for n in names if n in layer.lora_A]) for layer in self._layers]
        # expert index (in config order) -> slot in that layer's stack, -1 where the layer lacks the expert
        self._slots = [torch.tensor([s.names.index(n) if n in s.names else -1 for n in names]) for s in self._stacks]
        self._present = [torch.tensor([i for i, n in enumerate(names) if n in s.names]) for s in self._stacks]
        ref = next(iter(model.parameters()))
        self.internal_xlora_classifier = XLoraClassifier(config, len(names), len(self._layers), ref.dtype, ref.device)
        self._scalings: Optional[torch.Tensor] = None
        self._in_scaling_pass = False
        self.latest_scalings: Optional[torch.Tensor] = None
        # The experts of a layer run in one call, so sibling grouping has nothing to share; each layer's
        # forward is replaced on the instance (seen by every thread, unlike the per-thread mixed_batch hook).
        ungroup_siblings(model)
        for i, layer in enumerate(self._layers):
            layer.forward = self._layer_forward_fn(i, layer)
        self._hook = model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)

    # -- the two passes ----------------------------------------------------------------------------
    def _pre_forward(self, module, args, kwargs):
        if self._in_scaling_pass or self._layers[0].disable_adapters:
            return None
        ref = kwargs.get("input_ids", args[0] if args else None)
        if ref is None:
            ref = kwargs.get("inputs_embeds")
        if ref is None:
            raise ValueError("X-LoRA needs input_ids or inputs_embeds to size the routing weights")
        kwargs = dict(kwargs)
        if getattr(getattr(module, "config", None), "use_cache", None) is not None:
            kwargs["use_cache"] = False  # routing is per token of the whole sequence: no KV cache (as PEFT)
        b, s = ref.shape[:2]
        dtype = self.internal_xlora_classifier.layers[-1].weight.dtype
        self._scalings = torch.full((b, s, len(self._layers), len(self.config.adapters)),
                                    float(self.config.scaling_pass_value), dtype=dtype, device=ref.device)
        self._in_scaling_pass = True
        try:
            with torch.no_grad():
                out = module(*args, **{**kwargs, "output_hidden_states": True, "return_dict": True})
        finally:
            self._in_scaling_pass = False
        self._scalings = self.internal_xlora_classifier(out.hidden_states[-1])
        self.latest_scalings = self._scalings
        return args, kwargs

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        kwargs["use_cache"] = False
        return self.model.generate(*args, **kwargs)

    # -- one layer ---------------------------------------------------------------------------------
    def _layer_forward_fn(self, index: int, layer: LoraLinear):
        def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            return self._layer_forward(index, layer, x)
        return forward

    def _global_weight(self) -> float:
        """g, the factor on every expert term (and expert bias): 1 for a layer called outside a model call."""
        return 1.0 if self._scalings is None else self.config.global_scaling_weight

    def _routing(self, index: int, t: int, lead: tuple, device):
        """(expert ids [T, k], weights [T, k]) in config order, PEFT's top-k and softmax-top-k rules."""
        n = len(self.config.adapters)
        if self._scalings is None:  # layer called outside a model call: every expert at weight 1 (as PEFT)
            ones = torch.ones(t, n, device=device)
            return torch.arange(n, device=device).expand(t, n), ones, self._global_weight()
        c = self._scalings[..., index, :]
        if tuple(c.shape[:-1]) != tuple(lead) and c.shape[:-1].numel() != t:
            raise ValueError(f"X-LoRA routing weights are for {tuple(c.shape[:-1])} tokens, the layer got {lead}")
        c = c.reshape(t, n)
        k = self.config.top_k_lora
        if k is None:
            return torch.arange(n, device=device).expand(t, n), c, self._global_weight()
        vals, ids = torch.topk(c, k=k, dim=-1)
        if self.config.enable_softmax_topk:
            nonzero = vals != 0
            vals = torch.softmax(vals.masked_fill(~nonzero, float("-inf")), dim=-1).masked_fill(~nonzero, 0.0)
        return ids, vals, self._global_weight()

    def _layer_forward(self, index: int, layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
        if layer.disable_adapters or layer.merged_adapters:
            return layer.base_layer(x)
        stack = self._stacks[index]
        weight, bias = layer.base_weight(), layer.base_bias()
        if x.dtype != weight.dtype:
            raise TypeError(f"input dtype {x.dtype} does not match the base layer's weight dtype {weight.dtype}")
        if stack.biased:  # PEFT adds each expert's s * g * lora_B.bias whatever the routing weight
            g = self._global_weight()
            extra = g * sum(layer.scaling[n] * layer.lora_B[n].bias for n in stack.biased).to(x.dtype)
            bias = extra if bias is None else bias + extra
        if self._in_scaling_pass and float(self.config.scaling_pass_value) == 0.0:
            return F.linear(x, weight, bias)  # every expert at weight 0: the base alone
        lead, t = tuple(x.shape[:-1]), x[..., 0].numel()
        ids, vals, g = self._routing(index, t, lead, x.device)
        x2 = x.reshape(t, x.shape[-1])
        dropout = self.training and any(layer.lora_dropout_p[n] > 0 for n in stack.names)
        grad = torch.is_grad_enabled() and (vals.requires_grad or stack.trainable())
        if grad or dropout or self._concat(x.device):
            if self.config.top_k_lora is None and self._scalings is not None:  # dense: pick the layer's columns
                present = self._present[index]
                dense = vals if len(present) == vals.shape[1] else vals[:, present.to(vals.device)]
                dense = dense * g
            else:
                slots = self._slots[index].to(ids.device)[ids]  # [T, k] slot in this layer's stack, -1 = absent
                dense = torch.zeros(t, len(stack.names) + 1, dtype=vals.dtype, device=vals.device)
                slot_or_spare = torch.where(slots < 0, len(stack.names), slots)  # the spare column takes absents
                dense = dense.scatter_add(1, slot_or_spare, vals * g)[:, :-1]
            if grad or dropout:
                y = self._differentiable(layer, stack, x2, weight, bias, dense.to(x2.dtype), dropout)
            else:
                y = self._concat_inference(stack, x2, weight, bias, dense.to(x2.dtype))
        else:
            slots = self._slots[index].to(ids.device)[ids]
            a, b, scal, ranks = stack.get()
            y = multi_lora_linear(x2, weight, bias, a, b, scal, slots, ranks, (vals * g).to(torch.float32).detach(),
                                  validate=False)
        return y.reshape(*lead, y.shape[-1])

    def _concat(self, device: torch.device) -> bool:
        """'auto': the fused Triton kernel where it runs; on the PyTorch reference backend (CPU) the
        concatenated form, which is two GEMMs instead of the reference's per-slot gathers (measured,
        docs/variants.md)."""
        if self.weighted_pass != "auto":
            return self.weighted_pass == "concat"
        from ..ops.backend import choose_backend

        return choose_backend(device) == "reference"

    @staticmethod
    def _weight_columns(stack: _ExpertStack, u: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """u [T, sum r] with each expert's block of columns times its weight (dense [T, experts])."""
        if stack.equal_rank is not None:  # broadcast the weights over each expert's block, no gather
            return (u.view(-1, len(stack.names), stack.equal_rank) * dense[:, :, None]).view(u.shape)
        return u * dense[:, stack.column_expert.to(u.device)]

    @classmethod
    def _concat_inference(cls, stack: _ExpertStack, x2, weight, bias, dense):
        """The two-GEMM form with the cached concatenated factors (no gradient needed)."""
        a_cat, b_cat_t = stack.concat(x2.dtype)
        u = cls._weight_columns(stack, x2 @ a_cat.t(), dense)
        y = F.linear(x2, weight, bias)
        return y.addmm_(u, b_cat_t)

    @classmethod
    def _differentiable(cls, layer, stack: _ExpertStack, x2, weight, bias, dense, dropout: bool):
        """base + sum_i dense[:, i] s_i B_i A_i x (dense [T, experts of this layer], weights already times g)."""
        names = stack.names
        y = F.linear(x2, weight, bias)
        if dropout:  # each expert its own dropout(c_i x), as PEFT
            for i, name in enumerate(names):
                xi = F.dropout(x2 * dense[:, i:i + 1], layer.lora_dropout_p[name], training=True)
                a, b = layer.lora_A[name].weight.to(x2.dtype), layer.lora_B[name].weight.to(x2.dtype)
                y = y + (xi @ a.t()) @ b.t() * layer.scaling[name]
            return y
        a_cat = torch.cat([layer.lora_A[m].weight for m in names]).to(x2.dtype)
        b_cat = torch.cat([layer.lora_B[m].weight * layer.scaling[m] for m in names], dim=1).to(x2.dtype)
        return torch.addmm(y, cls._weight_columns(stack, x2 @ a_cat.t(), dense), b_cat.t())

    # -- PEFT's helpers ----------------------------------------------------------------------------
    def get_latest_scalings(self) -> Optional[torch.Tensor]:
        return self.latest_scalings

    def set_topk_lora(self, value: Optional[int]) -> None:
        n = len(self.config.adapters)
        if value is not None and not (isinstance(value, int) and 1 <= value <= n):
            raise ValueError(f"top_k_lora must be None or an int in [1, {n}], got {value!r}")
        self.config.top_k_lora = value

    def set_global_scaling_weight(self, weight: float) -> None:
        self.config.global_scaling_weight = float(weight)

    def set_scaling_pass_value(self, value: Optional[float]) -> None:
        """None: 1 / n_experts (PEFT's rule)."""
        self.config.scaling_pass_value = 1.0 / len(self.config.adapters) if value is None else float(value)

    @contextlib.contextmanager
    def disable_adapters(self):
        from .inject import disable_adapters

        with disable_adapters(self.model):
            yield self

    def unload(self) -> nn.Module:
        """Remove the routing (hook, layer forwards) and the experts; returns the plain model."""
        self._hook.remove()
        for layer in self._layers:
            layer.__dict__.pop("forward", None)
        for name in self.config.expert_names:
            delete_adapter(self.model, name)
        return self.model
