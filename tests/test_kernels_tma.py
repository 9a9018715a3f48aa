"""The two main GEMMs on both kernel families, under Triton's interpreter: the persistent
tensor-descriptor (TMA) kernels of ``kernels/lora_tma.py`` and their pointer twins (the sm_80
path), each vs the PyTorch reference and fp64 (max|kernel - fp64| <= 2 max|reference - fp64| + atol).

Shapes keep rows 16-byte aligned (K, N multiples of 8) so the descriptor kernels can run, but
off the interpreter's 32x32x16 block grid, with M = 1 and odd M, r from 1 to 64 (256: the
pointer kernels run, as on a GPU), a transposed
(GPT-2 Conv1D) weight read through its [K, N] storage, p = 0 and p > 0.
"""

from __future__ import annotations

import os

import pytest
import torch
from twice_rule import check_lora_linear

from lora_triton.reference import lora_linear as ref

if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 (tests/conftest.py) or a GPU", allow_module_level=True)

kern = pytest.importorskip("lora_triton.kernels.lora_linear")
gl = pytest.importorskip("lora_triton.kernels.gemm_launch")
grouped = pytest.importorskip("lora_triton.kernels.grouped")

# (M, K, N, r, transposed weight, bias)
SHAPES = [(1, 48, 40, 1, False, True), (37, 80, 56, 16, True, False), (70, 40, 72, 3, False, True),
          (9, 64, 40, 64, False, False), (5, 32, 24, 256, True, True)]


@pytest.fixture
def kinds(monkeypatch):
    """Which kernel family each main-GEMM launch took."""
    seen = []
    for name in ("fwd_gemm", "dgrad"):
        real = getattr(gl, name)

        def record(*args, _real=real, _name=name, **kwargs):
            kind = _real(*args, **kwargs)
            seen.append((_name, kind))
            return kind

        monkeypatch.setattr(gl, name, record)
    return seen


def _case(m, k, n, r, transposed, bias, dtype, seed=0):
    g = torch.Generator().manual_seed(seed + 7 * m + k + n + r)
    rnd = lambda *s: torch.randn(*s, generator=g)
    w = (rnd(k, n) / k**0.5).t() if transposed else rnd(n, k) / k**0.5
    c = dict(x=rnd(m, k), w=w, b=rnd(n) if bias else None, a=rnd(r, k) / k**0.5, bb=rnd(n, r) / r**0.5,
             dy=rnd(m, n))
    return {key: None if t is None else t.to(dtype) for key, t in c.items()}




def _poison(monkeypatch):
    monkeypatch.setattr(kern, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype))


@pytest.mark.parametrize("family", ["tma", "pointer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("idx", range(len(SHAPES)), ids=[f"M{s[0]}K{s[1]}N{s[2]}r{s[3]}" for s in SHAPES])
def test_main_gemms_match_reference(idx, p, dtype, family, kinds, monkeypatch):
    if family == "pointer":
        monkeypatch.setattr(gl, "tma_device", lambda device: False)
    _poison(monkeypatch)
    m, k, n, r, transposed, bias = SHAPES[idx]
    c = _case(m, k, n, r, transposed, bias, dtype)
    x, w, b, a, bb, dy = c["x"], c["w"], c["b"], c["a"], c["bb"], c["dy"]
    seed_t = torch.tensor([4242 + idx], dtype=torch.int64) if p > 0 else None
    y, u = kern.lora_linear_fwd(x, w, b, a, bb, 0.75, p, seed_t)
    got = (y, u, *kern.lora_linear_bwd(dy, x, w, a, bb, u, 0.75, p, seed_t, True))
    check_lora_linear(got, c, 0.75, p, seed_t, dtype)
    ran = family if r <= 64 else "pointer"  # beyond r_pad 64 the persistent tiles do not fit (gemm_launch)
    assert kinds == [("fwd_gemm", ran), ("dgrad", ran)]


def test_unaligned_operands_fall_back_to_pointer_kernels(kinds):
    # K = 36 fp16: 72-byte rows, not a multiple of 16; a sliced x has inner stride 2.
    c = _case(9, 36, 24, 4, False, True, torch.float16)
    y, u = kern.lora_linear_fwd(c["x"], c["w"], c["b"], c["a"], c["bb"], 0.5, 0.0, None)
    yr, _ = ref.lora_linear_fwd(c["x"], c["w"], c["b"], c["a"], c["bb"], 0.5, 0.0, None)
    x2 = torch.randn(9, 96).to(torch.float16)[:, ::2]
    c2 = _case(9, 48, 24, 4, False, False, torch.float16)
    kern.lora_linear_fwd(x2, c2["w"], None, c2["a"], c2["bb"], 0.5, 0.0, None)
    torch.testing.assert_close(y.float(), yr.float(), rtol=2e-2, atol=2e-2)
    assert kinds == [("fwd_gemm", "pointer"), ("fwd_gemm", "pointer")]


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_grouped_dgrad_accumulates_through_tma(p, kinds, monkeypatch):
    """The grouped op's dgrad: the first projection stores, the others add (ACCUMULATE) via TMA."""
    from lora_triton.reference import grouped as gref

    g = torch.Generator().manual_seed(5)
    m, k, ns, rs = 21, 48, (40, 16), (3, 8)
    x = torch.randn(m, k, generator=g)
    ws = [torch.randn(n, k, generator=g) / k**0.5 for n in ns]
    bs = [None, torch.randn(ns[1], generator=g)]
    a_s = [torch.randn(r, k, generator=g) / k**0.5 for r in rs]
    b_s = [torch.randn(n, r, generator=g) for n, r in zip(ns, rs)]
    dys = [torch.randn(m, n, generator=g) for n in ns]
    ps, seeds = (p, p / 2), torch.tensor([11, 12], dtype=torch.int64)
    ys, u_cat = grouped.lora_linear_grouped_fwd(x, ws, bs, a_s, b_s, (0.5, 2.0), ps, seeds)
    dx, d_as, d_bs = grouped.lora_linear_grouped_bwd(dys, x, ws, a_s, b_s, u_cat, (0.5, 2.0), ps, seeds)
    yr, ur = gref.lora_linear_grouped_fwd(x, ws, bs, a_s, b_s, (0.5, 2.0), ps, seeds)
    dxr, d_asr, d_bsr = gref.lora_linear_grouped_bwd(dys, x, ws, a_s, b_s, ur, (0.5, 2.0), ps, seeds)
    for got, want in zip([*ys, dx, *d_as, *d_bs], [*yr, dxr, *d_asr, *d_bsr]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert kinds == [("fwd_gemm", "tma")] * 2 + [("dgrad", "tma")] * 2


def test_descriptor_eligibility():
    x = torch.zeros(4, 64, dtype=torch.float16)
    assert gl._desc_ok(x) and not gl._desc_ok(x[:, 1:]) and not gl._desc_ok(x[:, ::2])
    assert not gl._desc_ok(torch.zeros(4, 36, dtype=torch.float16))  # 72-byte rows
    w = torch.zeros(64, 40).t()  # [40, 64] view of [64, 40] storage
    assert gl._weight_desc(w)[1] is True and gl._weight_desc(w.t())[1] is False
    assert gl._weight_desc(torch.zeros(64, 80)[:, ::2]) is None


def test_autotuners_protect_accumulated_outputs():
    """On a GPU the autotuner times each config by running it: dx accumulated into must be restored
    after each run and dA summed by atomics zeroed before each (and before the real launch)."""
    for name in ("dx", "dx_tma"):
        assert gl._tuned(name, True, True).reset_to_zero == ["da_ptr"]
        assert gl._tuned(name, True, True).restore_value == ["dx_ptr"]
        plain = gl._tuned(name, False, False)
        assert not plain.reset_to_zero and not plain.restore_value  # never zeroes a dummy pointer
    assert all(c.pre_hook is gl._set_blocks for c in gl._tuned("fwd_tma").configs)


def test_tile_pruning_per_arch_and_dropout():
    at = pytest.importorskip("lora_triton.kernels.autotune")
    cfgs = at.CONFIGS["gemm_tma"]()
    pick = lambda **kw: [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["FLATTEN"])
                         for c in at.prune("gemm_tma", cfgs, 2, smem_limit=232448, **kw)]
    assert pick(r_pad=16, cc_major=9)[0] == (128, 256, True)
    assert pick(r_pad=64, cc_major=9)[0] == (128, 128, True)  # one r chunk more per thread: 128x256 pruned
    assert pick(r_pad=16, has_dropout=True, cc_major=9)[0] == (128, 128, False)  # nested loops with dropout
    assert all(not fl for _, _, fl in pick(r_pad=16, cc_major=10))  # sm_100: nested loops only
