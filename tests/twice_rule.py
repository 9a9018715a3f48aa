"""The team's kernel check: |kernel - fp64| <= 2 |same-precision reference - fp64| + atol, shared by
every interpreter test of a kernel (LoRA, TMA, composed, DoRA, NF4)."""

from __future__ import annotations

import torch

ATOL = {torch.float32: 2e-5, torch.float16: 2e-3}


def f64(t):
    return None if t is None else t.double()


def check_2x(name, got, refv, truth, dtype):
    got, refv, truth = got.double(), refv.double(), truth.double()
    assert torch.isfinite(got).all(), f"{name}: non-finite values (an element was never written?)"
    err = (got - truth).abs().max().item()
    ref_err = (refv - truth).abs().max().item()
    atol = ATOL[dtype] * (1.0 + truth.abs().max().item())
    assert err <= 2 * ref_err + atol, f"{name}: err {err:.3g} vs reference err {ref_err:.3g} (atol {atol:.3g})"
