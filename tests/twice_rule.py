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


def lora_linear_refs(c, scaling, p, seed_t, need_dx=True):
    """(y, u, dx, dA, dB) of the LoRA linear reference in the operands' precision and in fp64, for the
    case dict c (x, w, b, a, bb, dy) that the LoRA, TMA and composed kernel tests build."""
    from lora_triton.reference import lora_linear as ref

    x, w, b, a, bb, dy = c["x"], c["w"], c["b"], c["a"], c["bb"], c["dy"]
    yr, ur = ref.lora_linear_fwd(x, w, b, a, bb, scaling, p, seed_t)
    refv = (yr, ur, *ref.lora_linear_bwd(dy, x, w, a, bb, ur, scaling, p, seed_t, need_dx))
    y64, u64 = ref.lora_linear_fwd(f64(x), f64(w), f64(b), f64(a), f64(bb), scaling, p, seed_t)
    truth = (y64, u64, *ref.lora_linear_bwd(f64(dy), f64(x), f64(w), f64(a), f64(bb), u64, scaling, p, seed_t,
                                            need_dx))
    return refv, truth


def check_lora_linear(got, c, scaling, p, seed_t, dtype):
    """check_2x on each of the kernel's (y, u, dx, dA, dB) against lora_linear_refs."""
    refv, truth = lora_linear_refs(c, scaling, p, seed_t)
    for name, gv, rv, tv in zip(("y", "u", "dx", "dA", "dB"), got, refv, truth):
        check_2x(name, gv, rv, tv, dtype)


def fp16_matmul_ok() -> bool:
    """Whether this CPU build runs fp16 matmuls (some do not): fp16 cases are skipped where it cannot."""
    try:
        torch.ones(2, 2, dtype=torch.float16) @ torch.ones(2, 2, dtype=torch.float16)
        return True
    except RuntimeError:
        return False
