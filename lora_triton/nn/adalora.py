"""AdaLoRA (Zhang et al., 2023): SVD-form adapters whose rank budget is reallocated during training.

A layer holds ``lora_A`` [r, in], ``lora_E`` [r, 1] (the singular values) and ``lora_B`` [out, r] (PEFT's
names, ParameterDicts: no ``.weight``) and adds s D(x) (A * E)^T B^T with s = lora_alpha / (ranknum + 1e-5),
ranknum = init_r. The forward is our fused ``lora_linear`` op on A * E (an [r, in] product, tiny), so
autograd carries exact gradients to A, E and B through it.

The rank allocator follows PEFT 0.21.2 step for step (``RankAllocator``): importance |p * grad| smoothed
by beta1, its uncertainty by beta2, per-triplet score = E score + mean A-row score + mean B-column score,
a cubic budget schedule between tinit and total_step - tfinal, singular values at or below the global
k-th score zeroed (nothing is resized during training), the final mask at total_step - tfinal and kept
afterwards. ``update_and_allocate(model, global_step)`` is the call for a training loop (after
``backward`` and ``optimizer.step``, before ``zero_grad``); ``adalora_callback(model)`` does the same
from the HF Trainer. The orthogonal regulariser is ``orth_regularization(model)``; as in PEFT it is also
added to ``outputs.loss`` whenever the model returns a loss (a forward hook, while trainable).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..config import LoraConfig
from ..config_checks import check_int, check_number, is_int
from ..ops.lora_linear import lora_linear
from . import kinds
from .adapter_layer import AdapterLayer
from .inject import _check_name, _set_child, active_adapters, adapter_configs, add_modules_to_save, set_adapter
from .lora_linear import is_conv1d, is_supported_base, linear_features
from .targets import candidate_modules, find_targets, resolve_targets
from .transaction import transactional

STATE_ATTR = "_lora_triton_adalora"


@dataclass
class AdaLoraConfig(LoraConfig):
    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: Optional[int] = None
    rank_pattern: Optional[dict] = None  # "<path>.lora_E" -> [bool] * init_r (the kept singular values)
    peft_type: str = "ADALORA"

    def validate(self) -> None:
        peft_type = getattr(self.peft_type, "value", self.peft_type)
        if peft_type != "ADALORA":
            raise ValueError(f"peft_type must be 'ADALORA' for an AdaLoraConfig, got {peft_type!r}")
        pattern = self.rank_pattern
        # LoRA's checks apply to the shared fields; LoRA's rank_pattern holds ints, AdaLoRA's holds masks.
        self.peft_type, self.rank_pattern = "LORA", {}
        try:
            super().validate()
        finally:
            self.peft_type, self.rank_pattern = "ADALORA", pattern
        for name in ("init_r", "target_r", "deltaT"):
            check_int(name, getattr(self, name))
        if not is_int(self.total_step) or self.total_step <= 0:
            raise ValueError(f"AdaLoRA needs total_step (the number of training steps, > 0), got {self.total_step!r}")
        for name in ("tinit", "tfinal"):
            check_int(name, getattr(self, name), minimum=0)
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(f"tinit={self.tinit}, tfinal={self.tfinal}, total_step={self.total_step} leave no "
                             "budgeting phase (need 0 <= tinit < total_step - tfinal)")
        for name in ("beta1", "beta2"):
            check_number(name, getattr(self, name), 0.0, 1.0, low_open=True, high_open=True)
        check_number("orth_reg_weight", self.orth_reg_weight, low=0.0)
        for key, mask in (self.rank_pattern or {}).items():
            if not isinstance(mask, list) or len(mask) != self.init_r or not all(isinstance(m, bool) for m in mask):
                raise ValueError(f"rank_pattern[{key!r}] must be a list of init_r={self.init_r} bools, got {mask!r}")


class SVDLinear(AdapterLayer):
    """A frozen Linear / GPT-2 Conv1D plus AdaLoRA adapters (lora_A, lora_E, lora_B by adapter name).

    An ``AdapterLayer``: activation, disabling, merge / unmerge / merge_and_unload and deletion are the
    shared ones (``nn/inject.py``); the forward is the fused op on A * E."""

    param_dicts = ("lora_A", "lora_E", "lora_B")
    setting_dicts = ("scaling", "r", "lora_alpha", "ranknum", "lora_dropout_p")

    def __init__(self, base_layer: nn.Module):
        if not is_supported_base(base_layer):
            raise TypeError(f"SVDLinear wraps nn.Linear or transformers' Conv1D, got {type(base_layer).__name__}")
        super().__init__(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.in_features, self.out_features = linear_features(base_layer)
        self.lora_A, self.lora_E, self.lora_B = nn.ParameterDict(), nn.ParameterDict(), nn.ParameterDict()

    def add_adapter(self, name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                    init_weights: bool = True) -> None:
        self._check_new(name)
        kw = dict(dtype=self.adapter_dtype(), device=self.base_layer.weight.device)
        self.lora_A[name] = nn.Parameter(torch.zeros(r, self.in_features, **kw))
        self.lora_E[name] = nn.Parameter(torch.zeros(r, 1, **kw))
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, r, **kw))
        if init_weights:  # PEFT: A, B ~ N(0, 0.02), E = 0 (the adapter starts as the identity map)
            with torch.no_grad():
                self.lora_A[name].normal_(0.0, 0.02)
                self.lora_B[name].normal_(0.0, 0.02)
        self.r[name], self.lora_alpha[name], self.ranknum[name] = r, lora_alpha, float(r)
        # PEFT: lora_alpha / (ranknum + 1e-5), ranknum = init_r also after a resize (it is not saved)
        self.scaling[name] = (lora_alpha if lora_alpha > 0 else float(r)) / (float(r) + 1e-5)
        self.lora_dropout_p[name] = float(lora_dropout)

    def resize(self, name: str, keep: list[bool]) -> None:
        """Keep the ranks where ``keep`` is True (rank 0 allowed); the scaling keeps ranknum = init_r."""
        idx = torch.tensor(keep, dtype=torch.bool, device=self.lora_A[name].device)
        with torch.no_grad():
            a, e, b = self.lora_A[name][idx], self.lora_E[name][idx], self.lora_B[name][:, idx]
        for table, value in ((self.lora_A, a), (self.lora_E, e), (self.lora_B, b)):
            table[name] = nn.Parameter(value.clone(), requires_grad=table[name].requires_grad)
        self.r[name] = int(idx.sum())

    def base_weight(self) -> torch.Tensor:
        w = self.base_layer.weight
        return w.t() if self.fan_in_fan_out else w

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.mixed_batch is not None:
            return self.mixed_batch(self, x, *args, **kwargs)
        if self.disable_adapters and self.merged_adapters:
            self.unmerge()
        active = [] if self.disable_adapters else [a for a in self.active_adapters if a in self.lora_A and self.r[a]
                                                   and a not in self.merged_adapters]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        weight, bias = self.base_weight(), self.base_layer.bias
        y = None
        for name in active:
            a_e = self.lora_A[name] * self.lora_E[name]  # [r, in]: E folded into A, exact gradients via autograd
            p = self.lora_dropout_p[name] if self.training else 0.0
            out = lora_linear(x, weight if y is None else None, bias if y is None else None, a_e,
                              self.lora_B[name], self.scaling[name], p)
            y = out if y is None else y + out
        return y

    def adapter_forward(self, name: str, x: torch.Tensor) -> Optional[torch.Tensor]:
        if not self.r[name]:
            return None
        p = self.lora_dropout_p[name] if self.training else 0.0
        h = torch.nn.functional.dropout(x, p, training=True) if p > 0.0 else x
        a_e = (self.lora_A[name] * self.lora_E[name]).to(x.dtype)
        return (h @ a_e.t() @ self.lora_B[name].to(x.dtype).t()) * self.scaling[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        a_e = self.merge_value(self.lora_A[name]) * self.merge_value(self.lora_E[name])
        delta = (self.merge_value(self.lora_B[name]) @ a_e) * self.scaling[name]
        return delta.t() if self.fan_in_fan_out else delta

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={self.r[n]}" for n in self.lora_A)
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters=[{ranks}]"


class RankAllocator:
    """PEFT's rank allocator, on parameter names ``<path>.lora_{A,E,B}.<adapter>``."""

    def __init__(self, model: nn.Module, config: AdaLoraConfig, adapter_name: str):
        self.config, self.adapter_name = config, adapter_name
        self.reset_ipt()
        # Names end in ".lora_A.<adapter>" (PEFT tests a substring, which also matches other adapters' names).
        own = [(n, p) for n, p in model.named_parameters() if n.endswith(f".lora_A.{adapter_name}")]
        self.triplets = sorted(n.replace("lora_A", "%s") for n, _ in own)
        self.init_bgt = sum(p.shape[0] for _, p in own)
        self.target_bgt = config.target_r * len(self.triplets)

    def reset_ipt(self) -> None:
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        c = self.config
        if step <= c.tinit:
            return self.init_bgt, False
        if step > c.total_step - c.tfinal:
            return self.target_bgt, True
        frac = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        return int((self.init_bgt - self.target_bgt) * frac ** 3 + self.target_bgt), step % c.deltaT == 0

    def update_ipt(self, model: nn.Module) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" not in n or not n.endswith(f".{self.adapter_name}"):
                    continue
                if p.grad is None:
                    raise RuntimeError(f"{n} has no gradient: call update_and_allocate after backward(), "
                                       "before zero_grad()")
                ipt = (p * p.grad).abs()
                avg = self.exp_avg_ipt.get(n, torch.zeros_like(p))
                unc = self.exp_avg_unc.get(n, torch.zeros_like(p))
                avg = b1 * avg + (1 - b1) * ipt
                self.exp_avg_ipt[n], self.exp_avg_unc[n] = avg, b2 * unc + (1 - b2) * (ipt - avg).abs()

    def _score(self, n: str) -> torch.Tensor:
        return self.exp_avg_ipt[n] * self.exp_avg_unc[n]

    def mask_to_budget(self, model: nn.Module, budget: int) -> dict[str, list[bool]]:
        params = dict(model.named_parameters())
        scores = {}
        for t in self.triplets:
            a_row = self._score(t % "lora_A").mean(dim=1)
            b_col = self._score(t % "lora_B").mean(dim=0)
            scores[t % "lora_E"] = self._score(t % "lora_E").view(-1) + a_row + b_col
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=self.init_bgt - budget).values.item()
        pattern = {}
        with torch.no_grad():
            for name, score in scores.items():
                drop = score <= threshold
                params[name].masked_fill_(drop.view(-1, 1), 0.0)
                pattern[name] = (~drop).tolist()
        return pattern

    def mask_using_rank_pattern(self, model: nn.Module, pattern: dict[str, list[bool]]) -> None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                key = n[: -len(self.adapter_name) - 1]
                if n.endswith(f".lora_E.{self.adapter_name}") and key in pattern:
                    keep = torch.tensor(pattern[key], dtype=torch.bool, device=p.device)
                    p.masked_fill_(~keep.view(-1, 1), 0.0)


@dataclass
class AdaLoraState:
    """The model's AdaLoRA adapters: at most one trainable (it owns the allocator and the orth hook),
    any number in inference mode, as in PEFT. Their configs live with the other adapters' configs."""
    model: nn.Module
    trainable: Optional[str] = None
    allocator: Optional[RankAllocator] = None
    hook: Optional[object] = None

    def names(self) -> list[str]:
        return [n for n, c in adapter_configs(self.model).items() if isinstance(c, AdaLoraConfig)]

    def live_trainable(self) -> Optional[str]:
        return self.trainable if self.trainable in self.names() else None

    @property
    def adapter_name(self) -> str:
        """The trainable adapter, else the first AdaLoRA adapter."""
        return self.live_trainable() or self.names()[0]

    @property
    def config(self) -> AdaLoraConfig:
        return adapter_configs(self.model)[self.adapter_name]


def adalora_state(model: nn.Module) -> AdaLoraState:
    state = model.__dict__.get(STATE_ATTR)
    if state is None or not state.names():
        raise ValueError("the model holds no AdaLoRA adapter (inject_adalora or load_adalora first)")
    return state


def adalora_layers(model: nn.Module) -> list[tuple[str, SVDLinear]]:
    return [(p, m) for p, m in model.named_modules() if isinstance(m, SVDLinear)]


ONE_TRAINABLE = ("AdaLoraModel supports only 1 trainable adapter. When using multiple adapters, set inference_mode "
                 "to True for all adapters except the one you want to train.")


@transactional
def inject_adalora(model: nn.Module, config: AdaLoraConfig, adapter_name: str = "default",
                   init_weights: Optional[bool] = None) -> nn.Module:
    """Wrap the targeted Linear / Conv1D layers with ``SVDLinear`` at rank init_r, or add ``adapter_name`` to
    the model's existing ones. PEFT's rules: one trainable AdaLoRA adapter per model (the others
    ``inference_mode=True``, frozen); the first adapter is the active one, later ones are added inactive
    (``set_adapter`` switches). ``bias`` and ``modules_to_save`` as for LoRA. ``inject_lora`` with an
    AdaLoraConfig comes here; the layers come from the adapter-kind registry (``nn/kinds.py``, "ADALORA")."""
    if not isinstance(config, AdaLoraConfig):
        raise TypeError(f"config must be a lora_triton AdaLoraConfig, got {type(config).__name__}")
    if init_weights is not None:
        config = dataclasses.replace(config, init_lora_weights=bool(init_weights))
    config.validate()
    _check_name(adapter_name)
    configs = adapter_configs(model)
    if adapter_name in configs:
        raise ValueError(f"adapter {adapter_name!r} already exists; loaded: {sorted(configs)}")
    others = [n for n, c in configs.items() if not isinstance(c, AdaLoraConfig)]
    if others:
        raise ValueError(f"the model holds non-AdaLoRA adapters {others}; AdaLoRA adapters cannot be mixed with "
                         "them (PEFT keeps one tuner type per model)")
    state = model.__dict__.get(STATE_ATTR) or AdaLoraState(model)
    if not config.inference_mode and state.live_trainable() is not None:
        raise ValueError(ONE_TRAINABLE)
    config = resolve_targets(model, config)
    targets = find_targets(model, config)
    if not targets:
        names = [p for p, m in candidate_modules(model) if p and is_supported_base(m)][:8]
        raise ValueError(f"target_modules={config.target_modules!r} matched no module; linear modules include {names}")
    bad = [p for p, m in targets if not (is_supported_base(m) or isinstance(m, SVDLinear))]
    if bad:
        raise TypeError(f"AdaLoRA targets nn.Linear and transformers' Conv1D; not {bad[:4]}")
    first = not configs
    previous_active = active_adapters(model)
    for path, module in targets:
        layer = kinds.attach(module, adapter_name, config, path)  # ADALORA_LINEAR below
        if layer is not module:
            layer.active_adapters = []
            _set_child(model, path, layer)
    add_modules_to_save(model, config, adapter_name)
    configs[adapter_name] = config
    set_adapter(model, [adapter_name] if first else previous_active)
    if config.inference_mode:  # PEFT's _freeze_adapter
        for _, layer in adalora_layers(model):
            for p in layer.adapter_parameters(adapter_name):
                p.requires_grad_(False)
    else:
        state.trainable = adapter_name
        state.allocator = RankAllocator(model, config, adapter_name)
        if state.hook is None:
            state.hook = model.register_forward_hook(_add_orth_reg_to_loss)
    model.__dict__[STATE_ATTR] = state
    return model


def orth_regularization(model: nn.Module) -> torch.Tensor:
    """orth_reg_weight * mean over the adapter's A and B of ||A A^T - I||_F and ||B^T B - I||_F (PEFT's term)."""
    state = adalora_state(model)
    terms = []
    for _, layer in adalora_layers(model):
        name = state.adapter_name
        if name in layer.lora_A:
            for cov in (layer.lora_A[name] @ layer.lora_A[name].t(), layer.lora_B[name].t() @ layer.lora_B[name]):
                terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype,
                                                                       device=cov.device)))
    if not terms:
        return torch.zeros(())
    return state.config.orth_reg_weight * torch.stack(terms).mean()


def _add_orth_reg_to_loss(model, args, output):
    state = model.__dict__.get(STATE_ATTR)
    if state is None or state.live_trainable() is None:  # deleted, or merged and unloaded
        return output
    loss = getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor):
        output.loss = loss + orth_regularization(model)
    return output


def update_and_allocate(model: nn.Module, global_step: int) -> Optional[dict[str, list[bool]]]:
    """One allocator step; returns the new rank pattern when masks changed (also stored in the config)."""
    state = adalora_state(model)
    if state.allocator is None or state.live_trainable() is None:
        raise ValueError(f"AdaLoRA adapters {state.names()} are in inference mode: nothing to allocate")
    c, alloc = state.config, state.allocator
    final = c.total_step - c.tfinal
    if global_step < final:
        alloc.update_ipt(model)
        budget, mask = alloc.budget_schedule(global_step)
        if mask:
            c.rank_pattern = _strip(alloc.mask_to_budget(model, budget), state.adapter_name)
            return c.rank_pattern
        return None
    if global_step == final:
        budget, _ = alloc.budget_schedule(global_step)
        c.rank_pattern = _strip(alloc.mask_to_budget(model, budget), state.adapter_name)
        alloc.reset_ipt()
        return c.rank_pattern
    if c.rank_pattern:
        alloc.mask_using_rank_pattern(model, c.rank_pattern)
    return None


def _strip(pattern: dict[str, list[bool]], adapter_name: str) -> dict[str, list[bool]]:
    """Keys as PEFT saves them: ``<path>.lora_E`` (the adapter name removed)."""
    suffix = f".lora_E.{adapter_name}"
    return {k[: -len(suffix)] + ".lora_E": v for k, v in pattern.items()}


def adalora_callback(model: nn.Module):
    """A transformers ``TrainerCallback`` calling ``update_and_allocate`` after each optimizer step."""
    from transformers import TrainerCallback

    class AdaLoraCallback(TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kwargs):
            update_and_allocate(model, state.global_step)

    return AdaLoraCallback()



# -- the ADALORA adapter kind (nn/kinds.py): load_adapter / save_adapter / inject_lora dispatch on it ----
def _kept(config: AdaLoraConfig, path: str) -> Optional[list[bool]]:
    """The layer's mask in ``config.rank_pattern`` (a saved adapter's config): its layer is built at the kept
    ranks, which is what the saved, sliced tensors hold (PEFT resizes on load the same way)."""
    return (config.rank_pattern or {}).get(f"{path}.lora_E")


def _add_svd(layer: SVDLinear, name: str, config: AdaLoraConfig, path: str) -> None:
    layer.add_adapter(name, config.init_r, config.lora_alpha, config.lora_dropout, bool(config.init_lora_weights))
    keep = _kept(config, path)
    if keep is not None:
        layer.resize(name, keep)


def _wrap_svd(base: nn.Module, name: str, config: AdaLoraConfig, path: str) -> SVDLinear:
    layer = SVDLinear(base).train(base.training)
    _add_svd(layer, name, config, path)
    return layer


def _svd_shapes(base: nn.Module, config: AdaLoraConfig, path: str) -> dict[str, tuple[int, int]]:
    in_f, out_f = linear_features(base)
    keep = _kept(config, path)
    r = config.init_r if keep is None else sum(keep)
    return {"lora_A": (r, in_f), "lora_E": (r, 1), "lora_B": (out_f, r)}


ADALORA_LINEAR = kinds.LayerType("nn.Linear / transformers Conv1D", is_supported_base, SVDLinear, wrap=_wrap_svd,
                                 add=_add_svd, shapes=_svd_shapes, tensors=lambda layer, n: layer.adapter_tensors(n))
kinds.register(kinds.AdapterKind("ADALORA", AdaLoraConfig, (ADALORA_LINEAR,)))
