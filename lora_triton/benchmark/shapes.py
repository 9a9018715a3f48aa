"""Projection shapes of real models and the multi-adapter serving grid.

(in_features, out_features) of each attention / MLP projection, from the models' config.json:
hidden size, intermediate size and key-value heads x head_dim (grouped-query attention).
``tiny`` is not a model: it keeps the harness's own tests fast.
"""

from __future__ import annotations

from dataclasses import dataclass

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    intermediate: int
    kv_dim: int  # num_key_value_heads * head_dim
    max_tokens: int = 1 << 30  # caps suite token counts (only ``tiny`` sets it)

    def projection(self, proj: str) -> tuple[int, int]:
        """(in_features, out_features) of one projection."""
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        table = {
            "q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }
        if proj not in table:
            raise ValueError(f"unknown projection {proj!r}; choose from {PROJECTIONS}")
        return table[proj]

    def projections(self) -> dict[str, tuple[int, int]]:
        return {p: self.projection(p) for p in PROJECTIONS}


MODELS: dict[str, ModelShape] = {
    # Llama-3-8B: 32 heads x 128, 8 KV heads.
    "llama-8b": ModelShape("llama-8b", hidden=4096, intermediate=14336, kv_dim=1024),
    # Llama-3-70B: 64 heads x 128, 8 KV heads.
    "llama-70b": ModelShape("llama-70b", hidden=8192, intermediate=28672, kv_dim=1024),
    # Mistral-7B-v0.1: 32 heads x 128, 8 KV heads.
    "mistral-7b": ModelShape("mistral-7b", hidden=4096, intermediate=14336, kv_dim=1024),
    # Qwen2.5-7B: 28 heads x 128, 4 KV heads.
    "qwen2.5-7b": ModelShape("qwen2.5-7b", hidden=3584, intermediate=18944, kv_dim=512),
    "tiny": ModelShape("tiny", hidden=64, intermediate=128, kv_dim=32, max_tokens=32),
}


def parse_models(spec: str) -> list[ModelShape]:
    """'llama-8b', 'llama-8b,qwen2.5-7b' or 'all' (every real model, not ``tiny``)."""
    names = [n.strip().lower() for n in spec.split(",") if n.strip()]
    if not names:
        raise ValueError("--shapes needs at least one model name")
    if names == ["all"]:
        return [m for n, m in MODELS.items() if n != "tiny"]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise ValueError(f"unknown model shapes {unknown}; choose from {sorted(MODELS)} or 'all'")
    return [MODELS[n] for n in names]


# The serving grid: tokens in flight x distinct adapters x rank. Suites pick capped subsets;
# ``serve_grid_points`` enumerates the whole grid for ``--suite grid``.
SERVE_TOKENS = (1, 4, 16, 64, 256, 1024, 8192)
SERVE_ADAPTERS = (1, 8, 64, 256, 512)
SERVE_RANKS = (8, 16, 32, 64)
MIXED_RANKS = (8, 16, 32, 64)  # cycled over adapters; mean 30


def serve_grid_points() -> list[tuple[int, int, int]]:
    """(tokens, adapters, rank) with adapters <= tokens (each adapter serves >= 1 token)."""
    return [(t, a, r) for t in SERVE_TOKENS for a in SERVE_ADAPTERS for r in SERVE_RANKS if a <= t]
