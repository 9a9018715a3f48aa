"""Weighted combinations of adapters into a new adapter (PEFT's ``add_weighted_adapter``), done right.

Every combination type acts on what an adapter *does*, its delta dW_i = s_i B_i A_i (plus s_i b_i for
lora_bias), never on A and B separately:

* ``cat`` / ``linear``: sum w_i dW_i exactly, as A' = concat(w_i s_i A_i), B' = concat(B_i) (rank = sum of
  ranks). PEFT's ``cat`` is the same; PEFT's ``linear`` combines A's and B's separately, so B'A' holds
  cross terms B_i A_j (PEFT issue #3004).
* ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: the method applied to the dense deltas,
  stored exactly (A' = I, B' = merged dW, or the transpose: rank min(in, out), set per layer by
  rank_pattern). Use the ``*_svd`` forms for a low-rank result.
* ``svd`` and ``*_svd``: the method on the dense deltas, then a truncated SVD to ``svd_rank`` (default:
  the largest source rank), B' = U S, A' = Vh, as PEFT does (same random draws for DARE under a seed).
* ``*_factorwise`` (``linear_factorwise``, ``ties_factorwise``, ...): PEFT's factor-wise behaviour, kept
  only under these explicit names: the method on the A's with weights sign(w s) sqrt|w s| and on the B's
  with sqrt|w s|.

The new adapter has lora_alpha = r per layer (scaling 1, also for rsLoRA sources, where PEFT's copy
keeps use_rslora and scales by sqrt(r)), lora_bias if any source has it (PEFT drops the biases), and
targets exactly the layers holding any source. A DoRA source contributes the whole change it makes,
(m / ||W + s B A||_row)(W + s B A) - W (dense), so on layers with a DoRA source ``cat`` / ``linear`` are
stored exactly like the pruned types (PEFT drops the magnitudes); the new adapter is plain LoRA.
It is not activated. Bad input raises before anything changes.

Layer types: LoRA on Linear / Conv1D, Conv1d/2d/3d and Embedding, each seen as one [out, in] map
(``nn/merge_views.py``), so every type works on all of them (PEFT's SVD types fail on Conv1d / Conv3d,
PEFT #3769). A grouped conv keeps its block-diagonal B: ``cat`` / ``linear`` reorder the channels by
group (rank = the sum of the sources' ranks on that layer), the SVD types take one truncated SVD of
rank / groups per group (the rank must divide by groups), the exact pruned types store A' = dW, B' = I.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn

from .grouping import group_siblings
from .inject import _check_name, active_adapters, adapter_configs, adapter_layers, set_adapter
from .merge_views import view_of
from .modules_to_save import ModulesToSaveWrapper
from .targets import find_targets

_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
EXACT_TYPES = ("cat",) + _METHODS
SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
FACTORWISE_TYPES = tuple(f"{m}_factorwise" for m in _METHODS)
COMBINATION_TYPES = EXACT_TYPES + SVD_TYPES + FACTORWISE_TYPES


def _method_of(combination_type: str) -> str:
    """The task-arithmetic method behind a combination type ("linear" = weighted sum)."""
    base = combination_type.removesuffix("_factorwise").removesuffix("_svd")
    return {"cat": "linear", "svd": "linear"}.get(base, base)


# -- task arithmetic on stacked tensors (TIES: Yadav et al. 2023; DARE: Yu et al. 2023) ----------------
def _prune(t: torch.Tensor, density: float, random: bool) -> torch.Tensor:
    if density >= 1:  # nothing pruned, and no random numbers drawn (so seeded runs match PEFT's)
        return t
    if random:
        keep = torch.bernoulli(torch.full_like(t, density))
        return t * keep / density
    k = int(density * t.numel())
    keep = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    keep[torch.topk(t.abs().reshape(-1), k=k).indices] = 1
    return t * keep.reshape(t.shape)


def combine(method: str, tensors: Sequence[torch.Tensor], weights: Sequence[float], density: Optional[float] = None,
            majority_sign_method: str = "total") -> torch.Tensor:
    """PEFT's merge_utils semantics: "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"."""
    if method != "linear":
        tensors = [_prune(t, density, random=method.startswith("dare")) for t in tensors]
    stacked = torch.stack(list(tensors))
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    weighted = stacked * w.view(-1, *([1] * (stacked.dim() - 1)))
    if not method.endswith("ties"):
        return weighted.sum(0)
    sign = stacked.sign()
    votes = stacked.sum(0) if majority_sign_method == "total" else sign.sum(0)
    agree = sign == torch.where(votes >= 0, 1.0, -1.0).to(sign.dtype)
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


# -- checks --------------------------------------------------------------------------------------------
def _config_rank(config) -> int:
    return max(config.r, *config.rank_pattern.values()) if config.rank_pattern else config.r


def _check(model, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp, density,
           majority_sign_method) -> None:
    configs = adapter_configs(model)
    _check_name(adapter_name)
    if adapter_name in configs:
        raise ValueError(f"adapter {adapter_name!r} already exists; loaded: {sorted(configs)}")
    if isinstance(adapters, str) or not isinstance(adapters, Sequence) or not adapters:
        raise ValueError(f"adapters must be a non-empty list of adapter names, got {adapters!r}")
    missing = [a for a in adapters if a not in configs]
    if missing:
        raise KeyError(f"unknown adapters {missing}; loaded adapters: {sorted(configs)}")
    if len(set(adapters)) != len(adapters):
        raise ValueError(f"adapters must be distinct, got {list(adapters)}")
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) or len(weights) != len(adapters):
        raise ValueError(f"weights must be a list of {len(adapters)} numbers (one per adapter), got {weights!r}")
    if any(isinstance(w, bool) or not isinstance(w, (int, float)) or w != w for w in weights):
        raise ValueError(f"weights must be real numbers, got {list(weights)}")
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"combination_type must be one of {COMBINATION_TYPES}, got {combination_type!r}")
    method = _method_of(combination_type)
    if method != "linear":
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise ValueError(f"combination_type={combination_type!r} needs density in (0, 1], got {density!r}")
    if method.endswith("ties") and majority_sign_method not in ("total", "frequency"):
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank <= 0):
        raise ValueError(f"svd_rank must be a positive int or None, got {svd_rank!r}")
    if svd_clamp is not None and not (isinstance(svd_clamp, (int, float)) and 0 <= svd_clamp <= 1):
        raise ValueError(f"svd_clamp must be a quantile in [0, 1] or None, got {svd_clamp!r}")
    kinds = {a: getattr(configs[a].peft_type, "value", configs[a].peft_type) for a in adapters}
    if any(k != "LORA" for k in kinds.values()):
        raise TypeError(f"add_weighted_adapter combines LoRA adapters only, got {kinds} (PEFT refuses AdaLoRA "
                        "and the other kinds too)")
    for _path, view in _views(model, adapters):
        held = [a for a in adapters if view.holds(a)]
        dora = [a for a in held if view.is_dora(a)]
        if dora and combination_type in FACTORWISE_TYPES:
            raise ValueError(f"{combination_type} combines factors and cannot carry DoRA magnitudes ({dora}); "
                             "use a type that works on the deltas")
        merged = [a for a in held if a in view.layer.merged_adapters]
        if merged:
            raise ValueError(f"adapters {merged} are merged into the base weights; unmerge them first")
        if combination_type in FACTORWISE_TYPES and len({view.rank(a) for a in held}) > 1:
            raise ValueError(f"{combination_type} combines A and B factors and needs equal ranks; a layer has "
                             f"ranks {[view.rank(a) for a in held]} for {held}")
        if combination_type in SVD_TYPES and view.groups > 1:
            rank = svd_rank or max(_config_rank(configs[a]) for a in adapters)
            if rank % view.groups:
                raise ValueError(f"a conv with groups={view.groups} takes an SVD rank divisible by its groups (one "
                                 f"truncated SVD per group), got rank {rank}; pass svd_rank")
    for m in model.modules():
        if isinstance(m, ModulesToSaveWrapper) and sum(a in m.modules_to_save for a in adapters) > 1:
            raise ValueError("cannot combine adapters that hold modules_to_save copies of the same module "
                             f"({[a for a in adapters if a in m.modules_to_save]})")
    other = sorted(p for p, m in adapter_layers(model) if view_of(m) is None
                   and any(m.has_adapter(a) for a in adapters))
    if other:
        raise NotImplementedError(f"add_weighted_adapter combines LoRA on Linear, Conv and Embedding layers; "
                                  f"{other[:3]} hold other adapter layers of {list(adapters)}")
    if not _views(model, adapters):
        raise ValueError(f"adapters {list(adapters)} hold no LoRA layer")


def _views(model, adapters) -> list:
    """(path, view) of every LoRA layer (Linear, Conv, Embedding) holding any of ``adapters``."""
    views = [(p, view_of(m)) for p, m in adapter_layers(model)]
    return [(p, v) for p, v in views if v is not None and any(v.holds(a) for a in adapters)]


# -- per-layer construction ----------------------------------------------------------------------------
def _pad_rank(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    extra = rank - a.shape[0]
    if extra <= 0:
        return a[:rank], b[:, :rank]
    return torch.cat([a, a.new_zeros(extra, a.shape[1])]), torch.cat([b, b.new_zeros(b.shape[0], extra)], dim=1)


def _svd_factors(delta: torch.Tensor, rank: int, clamp, full_matrices: bool, driver) -> tuple[torch.Tensor, ...]:
    u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    k = min(rank, s.shape[0])
    b, a = u[:, :k] @ torch.diag(s[:k]), vh[:k, :]
    if clamp is not None:
        hi = torch.quantile(torch.cat([b.flatten(), a.flatten()]), clamp)
        b, a = b.clamp(-hi, hi), a.clamp(-hi, hi)
    return _pad_rank(a, b, rank)


def _grouped_svd_factors(delta, rank: int, groups: int, clamp, full_matrices, driver) -> tuple[torch.Tensor, ...]:
    """A grouped conv's B only sees its group's channels: one truncated SVD of rank / groups per group of
    output rows, B block-diagonal (``ConvView.write`` keeps the blocks)."""
    parts = [_svd_factors(rows, rank // groups, clamp, full_matrices, driver) for rows in delta.chunk(groups)]
    return torch.cat([a for a, _ in parts]), torch.block_diag(*[b for _, b in parts])


def _cat_factors(view, held: list[str], weights: list[float], dtype, rank: int):
    factors = [view.factors(n, dtype) for n in held]  # (a grouped conv's B is built block-diagonal: once)
    a = torch.cat([a * (w * view.layer.scaling[n]) for (a, _), n, w in zip(factors, held, weights)])
    b = torch.cat([b for _, b in factors], dim=1)
    if view.groups > 1:  # rank = the sum of the sources' ranks here, so no padding breaks the groups
        order = view.group_order([view.rank(n) for n in held])
        return a[order], b[:, order]
    return _pad_rank(a, b, rank)


def _layer_factors(view, held: list[str], weights: list[float], combination_type: str, rank: int, density,
                   majority_sign_method, svd_clamp, svd_full_matrices, svd_driver):
    """(A' [r, in], B' [out, r], bias' or None) of the new adapter on one layer (flat view), scaling 1;
    factor-wise types: (A', B') in the stored shapes."""
    method = _method_of(combination_type)
    dtype = view.dtype(held[0])
    if combination_type in ("cat", "linear") and not any(view.is_dora(n) for n in held):
        a, b = _cat_factors(view, held, weights, dtype, rank)
    elif combination_type in FACTORWISE_TYPES:
        ws = [w * view.layer.scaling[n] for n, w in zip(held, weights)]
        wa = [abs(x) ** 0.5 * (1 if x >= 0 else -1) for x in ws]
        a = combine(method, [view.raw_factors(n)[0].to(dtype) for n in held], wa, density, majority_sign_method)
        b = combine(method, [view.raw_factors(n)[1].to(dtype) for n in held], [abs(x) ** 0.5 for x in ws],
                    density, majority_sign_method)
    else:
        stored = combine(method, [view.stored_delta(n, dtype) for n in held], weights, density, majority_sign_method)
        delta = view.from_stored(stored)
        if combination_type in SVD_TYPES and view.groups > 1:
            a, b = _grouped_svd_factors(delta, rank, view.groups, svd_clamp, svd_full_matrices, svd_driver)
        elif combination_type in SVD_TYPES:
            a, b = _svd_factors(delta, rank, svd_clamp, svd_full_matrices, svd_driver)
        elif view.in_dim <= view.out_dim and view.groups == 1:  # exact: the identity on the smaller side
            a, b = torch.eye(view.in_dim, dtype=dtype, device=delta.device), delta
        else:  # (a grouped conv's B = I is block-diagonal)
            a, b = delta, torch.eye(view.out_dim, dtype=dtype, device=delta.device)
    bias = None
    if any(view.has_bias(n) for n in held):
        bias = combine(method, [view.scaled_bias(n, dtype) for n in held], weights, density, majority_sign_method)
    return a.contiguous(), b.contiguous(), bias


def _layer_rank(view, names: list[str], combination_type: str, rank: Optional[int]) -> int:
    """The new adapter's rank on one layer (see ``_new_rank``)."""
    if combination_type in FACTORWISE_TYPES:
        return view.rank(names[0])
    dora = any(view.is_dora(n) for n in names)
    if rank is None or (combination_type in ("cat", "linear") and dora):  # exact, dense
        return view.out_dim if view.groups > 1 else min(view.in_dim, view.out_dim)
    if combination_type in ("cat", "linear") and view.groups > 1:
        return sum(view.rank(n) for n in names)
    return rank


def _new_rank(configs, adapters, combination_type: str, svd_rank) -> Optional[int]:
    ranks = [_config_rank(configs[a]) for a in adapters]
    if combination_type in ("cat", "linear"):
        return sum(ranks)  # PEFT's layout: per-adapter rank slots, zero-padded where a layer has less
    if combination_type in SVD_TYPES:
        return svd_rank or max(ranks)
    return None  # factor-wise: each layer's common rank; exact pruned types: min(in, out) per layer


def _targets_config(model, configs, adapters, paths: list[str]):
    """PEFT's union of target_modules when it selects exactly ``paths``, else a regex naming each one."""
    first = configs[adapters[0]]
    sources = [configs[a] for a in adapters]
    same = all((c.layers_to_transform, c.layers_pattern, c.exclude_modules) ==
               (first.layers_to_transform, first.layers_pattern, first.exclude_modules) for c in sources)
    kinds = {type(c.target_modules) for c in sources}
    union = None
    if same and kinds == {list}:
        union = sorted(set().union(*(c.target_modules for c in sources)))
    elif same and kinds == {str}:
        union = "|".join(f"({c.target_modules})" for c in sources)
    if union is not None:
        candidate = dataclasses.replace(first, target_modules=union)
        if sorted(p for p, _ in find_targets(model, candidate)) == sorted(paths):
            return union, first.layers_to_transform, first.layers_pattern, first.exclude_modules
    return "|".join(re.escape(p) for p in sorted(paths)), None, None, None


def add_weighted_adapter(model: nn.Module, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: Optional[int] = None,
                         svd_clamp: Optional[float] = None, svd_full_matrices: bool = True,
                         svd_driver: Optional[str] = None, density: Optional[float] = None,
                         majority_sign_method: str = "total") -> nn.Module:
    """Add ``adapter_name`` = the ``weights``-weighted combination of ``adapters`` (see the module doc)."""
    _check(model, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp, density,
           majority_sign_method)
    adapters, weights = list(adapters), [float(w) for w in weights]
    configs = adapter_configs(model)
    rank = _new_rank(configs, adapters, combination_type, svd_rank)
    plan = []  # (path, view, source names, their weights, new rank, lora_bias)
    for path, view in _views(model, adapters):
        held = [(a, w) for a, w in zip(adapters, weights) if view.holds(a)]
        names = [a for a, _ in held]
        plan.append((path, view, names, [w for _, w in held], _layer_rank(view, names, combination_type, rank),
                     any(view.has_bias(n) for n in names)))
    top = max(p[4] for p in plan)
    patterns = {p[0]: p[4] for p in plan if p[4] != top}
    targets, layers_to_transform, layers_pattern, exclude = _targets_config(model, configs, adapters,
                                                                           [p[0] for p in plan])
    first = configs[adapters[0]]
    saved = [a for a in adapters if configs[a].modules_to_save]
    config = dataclasses.replace(
        first, r=top, lora_alpha=top, rank_pattern=dict(patterns), alpha_pattern=dict(patterns), use_rslora=False,
        use_dora=False,
        target_modules=targets, layers_to_transform=layers_to_transform, layers_pattern=layers_pattern,
        exclude_modules=exclude, lora_bias=any(p[5] for p in plan),
        modules_to_save=sorted({m for a in saved for m in configs[a].modules_to_save}) or None)
    previous_active = active_adapters(model)
    # The new layers are created before any value is computed, in PEFT's order, so that seeded DARE
    # draws the same random numbers as PEFT (its new adapter is injected first, too). A failure while
    # computing removes them again: the model is left as it was.
    for _path, view, _names, _ws, layer_rank, has_bias in plan:
        view.add(adapter_name, layer_rank, first.lora_dropout, has_bias)
    try:
        with torch.no_grad():
            for _path, view, names, ws, layer_rank, _has_bias in plan:
                a, b, bias = _layer_factors(view, names, ws, combination_type, layer_rank, density,
                                            majority_sign_method, svd_clamp, svd_full_matrices, svd_driver)
                (view.write_raw if combination_type in FACTORWISE_TYPES else view.write)(adapter_name, a, b)
                if bias is not None:
                    view.write_bias(adapter_name, bias)
    except BaseException:
        for _path, view, *_ in plan:
            if view.holds(adapter_name):
                view.delete(adapter_name)
        raise
    for m in model.modules():
        if isinstance(m, ModulesToSaveWrapper):
            source = next((a for a in adapters if a in m.modules_to_save), None)
            if source is not None:  # the one source's trained copy (weights do not apply to whole modules)
                m.modules_to_save[adapter_name] = copy.deepcopy(m.modules_to_save[source])
    configs[adapter_name] = config
    set_adapter(model, previous_active)
    group_siblings(model)
    return model

