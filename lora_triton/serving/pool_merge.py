"""Weighted merging on an ``AdapterPool``'s CPU copies: a serving-side new adapter without a model round trip.

``merge_pool_adapters(pool, adapters, weights, adapter_name, combination_type="cat", ...)`` combines
adapters the pool already holds and loads the result into the pool under ``adapter_name``. Only the
types whose result is low rank apply: ``cat`` / ``linear`` (exact, rank = sum of the sources' ranks per
layer) and the ``*_svd`` types (as ``add_weighted_adapter``; rank ``svd_rank``, default the largest
source rank). The result must fit the pool's max_rank. The math is ``nn.weighted_merge``'s.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Optional

import torch

from ..config import LoraConfig
from ..nn.weighted_merge import SVD_TYPES, _method_of, _svd_factors, combine
from .pool import PREFIX, AdapterPool

POOL_TYPES = ("cat", "linear") + SVD_TYPES


def merge_pool_adapters(pool: AdapterPool, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                        combination_type: str = "cat", svd_rank: Optional[int] = None,
                        svd_clamp: Optional[float] = None, density: Optional[float] = None,
                        majority_sign_method: str = "total", pin: bool = False) -> str:
    """Load the combination into the pool under ``adapter_name``; returns its sha256 (see ``AdapterPool.load``)."""
    if combination_type not in POOL_TYPES:
        raise ValueError(f"combination_type for pool adapters must be one of {POOL_TYPES} (the others are full "
                         f"rank; use add_weighted_adapter on a model), got {combination_type!r}")
    if isinstance(adapters, str) or not adapters or len(set(adapters)) != len(adapters):
        raise ValueError(f"adapters must be a non-empty list of distinct names, got {adapters!r}")
    if isinstance(weights, (str, bytes)) or len(weights) != len(adapters):
        raise ValueError(f"weights must be a list of {len(adapters)} numbers (one per adapter), got {weights!r}")
    if _method_of(combination_type) != "linear" and not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise ValueError(f"combination_type={combination_type!r} needs density in (0, 1], got {density!r}")
    known = pool.adapters()
    missing = [a for a in adapters if a not in known]
    if missing:
        raise KeyError(f"unknown pool adapters {missing}; loaded: {sorted(known)}")
    with pool._lock:  # a consistent view of the CPU copies
        sources = [(pool._adapters[a].layers, float(w)) for a, w in zip(adapters, weights)]
    method = _method_of(combination_type)
    tensors, ranks = {}, {}
    for path in sorted({p for layers, _ in sources for p in layers}):
        held = [(layers[path], w) for layers, w in sources if path in layers]
        if combination_type in ("cat", "linear"):
            a = torch.cat([aa.double() * (w * s) for (aa, _, s), w in held])
            b = torch.cat([bb.double() for (_, bb, _), _w in held], dim=1)
        else:
            deltas = [(bb.double() @ aa.double()) * s for (aa, bb, s), _w in held]
            delta = combine(method, deltas, [w for _, w in held], density, majority_sign_method)
            rank = svd_rank or max(max(aa.shape[0] for aa, _, _ in layers.values()) for layers, _ in sources)
            a, b = _svd_factors(delta, min(rank, min(delta.shape)), svd_clamp, True, None)
        dtype = held[0][0][0].dtype
        tensors[f"{PREFIX}{path}.lora_A.weight"] = a.to(dtype).contiguous()
        tensors[f"{PREFIX}{path}.lora_B.weight"] = b.to(dtype).contiguous()
        ranks[path] = a.shape[0]
    top = max(ranks.values())
    patterns = {re.escape(p): r for p, r in ranks.items() if r != top}
    config = LoraConfig(r=top, lora_alpha=top, rank_pattern=patterns, alpha_pattern=dict(patterns),
                        target_modules="|".join(re.escape(p) for p in sorted(ranks)))
    return pool.load(adapter_name, tensors, config, pin=pin)
