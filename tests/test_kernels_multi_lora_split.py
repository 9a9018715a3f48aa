"""Split-K of the multi-adapter shrink, sized from the bytes each program streams (no GPU needed)."""

from __future__ import annotations

import pytest

ml = pytest.importorskip("lora_triton.kernels.multi_lora")


def test_split_from_bytes_per_tile():
    split = ml._shrink_split
    # T=256 tokens on 256 adapters, K=4096, bf16, r=16: one row per tile, ~140 KB per program
    # unsplit; the program count alone (260 tiles ~ two waves) would say 1.
    assert split(256, 4096, 256 + 4, 1, 16, 2) == 5
    assert split(256, 4096, 4 + 1, 1, 16, 2) == 8  # one adapter: few full tiles, capped at 8 ways
    assert split(512, 4096, 8 + 1, 1, 16, 2) == 1  # prefill: full tiles, no split
    assert split(16, 64, 2, 1, 16, 4) == 1  # tiny K: at least 256 columns per split
    assert split(256, 1024, 260, 1, 16, 2) == 2  # ~34 KB per tile
