"""The PyTorch Philox twin equals Triton's tl.rand / tl.randint bit for bit (under TRITON_INTERPRET=1)."""

from __future__ import annotations

import os

import pytest
import torch

from lora_triton.reference import philox
from lora_triton.reference.philox import apply_dropout, dropout_keep_mask, philox4x32, philox_rand, philox_randint

SEEDS = [0, 1, 12345, 2**31 - 1, 2**32 - 1, 2**32 + 7, 2**40 + 3, 2**62 + 11, 2**63 - 1]


def _offsets(start: int, n: int = 300) -> torch.Tensor:
    base = torch.arange(n, dtype=torch.int64) * 37 + start
    return torch.cat([base, torch.tensor([start, start + 1, 2**31 - 1, 2**32 - 1])]) if start >= 2**32 else base


# -- against tl.rand ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def triton_rand():
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 (tests/conftest.py) or a GPU")
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def rand_kernel(rand_ptr, int_ptr, off_ptr, seed, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        offs = tl.load(off_ptr + i, mask=m, other=0)
        tl.store(rand_ptr + i, tl.rand(seed, offs), mask=m)
        tl.store(int_ptr + i, tl.randint(seed, offs).to(tl.int32, bitcast=True), mask=m)

    def call(seed: int, offsets: torch.Tensor):
        n = offsets.numel()
        rand = torch.empty(n, dtype=torch.float32)
        ints = torch.empty(n, dtype=torch.int32)
        rand_kernel[(triton.cdiv(n, 128),)](rand, ints, offsets, seed, n, BLOCK=128)
        return rand, ints.to(torch.int64) & 0xFFFFFFFF

    return call


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("start", [0, 1000, 2**32 - 150, 2**32 + 5, 3 * 2**40 + 17])
def test_bit_exact_vs_tl_rand(triton_rand, seed, start):
    offsets = _offsets(start)
    rand, ints = triton_rand(seed, offsets)
    assert torch.equal(philox_randint(seed, offsets), ints)
    ours = philox_rand(seed, offsets)
    assert ours.dtype == torch.float32
    assert torch.equal(ours.view(torch.int32), rand.view(torch.int32))


def test_int32_offsets_same_stream(triton_rand):
    """Kernels may use int32 offsets when they fit: same numbers as int64."""
    offsets = torch.arange(0, 2**31 - 1, 2**31 // 257, dtype=torch.int32)
    rand, _ = triton_rand(77, offsets)
    assert torch.equal(philox_rand(77, offsets).view(torch.int32), rand.view(torch.int32))


def test_seed_tensor_equals_int():
    offsets = torch.arange(500, dtype=torch.int64)
    for seed in (5, 2**40 + 1):
        assert torch.equal(philox_randint(seed, offsets),
                           philox_randint(torch.tensor([seed], dtype=torch.int64), offsets))


# -- statistics and dropout ----------------------------------------------------------------------
def test_uniform_range_and_moments():
    u = philox_rand(2024, torch.arange(100_000, dtype=torch.int64))
    assert u.min().item() >= 0.0 and u.max().item() < 1.0
    assert abs(u.mean().item() - 0.5) < 0.006
    assert abs(u.var().item() - 1 / 12) < 0.002
    # Neighbouring offsets are uncorrelated.
    assert abs(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1].item()) < 0.01


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
@pytest.mark.parametrize("seed", [3, 2**33 + 1])
def test_keep_fraction(p, seed):
    rows, cols = 300, 257
    keep = dropout_keep_mask(seed, rows, cols, p)
    assert keep.shape == (rows, cols) and keep.dtype == torch.bool
    n = rows * cols
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma
    # Per row too (no row-structured bias).
    assert (keep.float().mean(1) - (1 - p)).abs().max().item() < 6 * (p * (1 - p) / cols) ** 0.5 + 1e-6


def test_mask_is_tiling_independent():
    """Element (i, j) depends only on (seed, i*cols + j): a row slice equals the full mask's rows."""
    full = dropout_keep_mask(9, 40, 33, 0.3)
    part = dropout_keep_mask(9, 10, 33, 0.3, row_offset=17)
    assert torch.equal(part, full[17:27])
    assert not torch.equal(dropout_keep_mask(10, 40, 33, 0.3), full)


def test_apply_dropout():
    x = torch.randn(20, 30)
    y = apply_dropout(x, 11, 0.25)
    keep = dropout_keep_mask(11, 20, 30, 0.25)
    torch.testing.assert_close(y, torch.where(keep, x / 0.75, torch.zeros(())), rtol=2e-7, atol=0)
    assert apply_dropout(x, 11, 0.0) is x
    xh = x.to(torch.float16)
    assert apply_dropout(xh, 11, 0.25).dtype == torch.float16


# -- the mask stream against the kernels' own helper ----------------------------------------------
try:  # a module-level kernel: @triton.jit resolves _dropout_scale through this module's globals
    import triton
    import triton.language as tl

    from lora_triton.kernels.lora_fwd import _dropout_scale

    @triton.jit
    def _mask_kernel(seed_ptr, out_ptr, K, row0, p, inv_keep, BR: tl.constexpr, BC: tl.constexpr):
        rows = row0 + tl.arange(0, BR)
        cols = tl.arange(0, BC)
        f = _dropout_scale(tl.load(seed_ptr), rows, cols, K, p, inv_keep)
        tl.store(out_ptr + tl.arange(0, BR)[:, None] * BC + cols[None, :], f)
except ImportError:
    _mask_kernel = None


@pytest.mark.parametrize("seed", [0, 123, 2**33 + 5, 2**62 + 12345])
@pytest.mark.parametrize("p", [0.03, 0.1, 0.5])
@pytest.mark.parametrize("row0,cols", [(0, 64), (3, 32), (2**27 + 1, 16)])
def test_mask_stream_bit_exact_vs_kernel_helper(seed, p, row0, cols):
    """reference dropout_keep_mask == kernels/lora_fwd._dropout_scale, including offsets >= 2**32."""
    if _mask_kernel is None:
        pytest.skip("triton is not installed")
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 (tests/conftest.py) or a GPU")
    out = torch.full((16, cols), float("nan"))
    _mask_kernel[(1,)](torch.tensor([seed], dtype=torch.int64), out, cols, row0, p, 1 / (1 - p), BR=16, BC=cols)
    keep = dropout_keep_mask(seed, 16, cols, p, row_offset=row0)
    assert torch.equal(out > 0, keep)
    assert torch.equal(out[keep], torch.full((int(keep.sum()),), 1 / (1 - p)))


# -- the lean generator against the straightforward one it replaced -------------------------------
def _oracle_words(seed: int, offsets: torch.Tensor):
    """Philox4x32-10 written plainly (4 masked multiplies per round): the generator before the lean one."""
    m32 = 0xFFFFFFFF
    k0, k1 = seed & m32, (seed >> 32) & m32
    c0, c1 = offsets & m32, (offsets >> 32) & m32
    c2, c3 = torch.zeros_like(c0), torch.zeros_like(c0)
    for _ in range(10):
        hi_a, lo_a = ((c0 * 0xD2511F53) >> 32) & m32, (c0 * 0xD2511F53) & m32
        hi_b, lo_b = ((c2 * 0xCD9E8D57) >> 32) & m32, (c2 * 0xCD9E8D57) & m32
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + 0x9E3779B9) & m32, (k1 + 0xBB67AE85) & m32
    return c0, c1, c2, c3


def _oracle_mask(seed: int, rows: int, cols: int, p: float, row_offset: int = 0) -> torch.Tensor:
    thr = int(torch.tensor(p, dtype=torch.float32) * 65536.0 + 0.5)
    groups = -(-cols // 8)
    counters = (torch.arange(rows, dtype=torch.int64)[:, None] + row_offset) * groups + torch.arange(groups)
    words = torch.stack(_oracle_words(seed, counters), -1)  # [rows, G, 4]
    keep = torch.stack(((words & 0xFFFF) >= thr, (words >> 16) >= thr), -1)  # [rows, G, 4, 2]
    return keep.reshape(rows, -1)[:, :cols]


ORACLE_SEEDS = [0, 7, 2**32 - 1, 2**32 + 7, 2**62 + 11, 2**63 - 1]


@pytest.mark.parametrize("seed", ORACLE_SEEDS)
def test_words_equal_oracle(seed):
    offsets = torch.cat([torch.arange(500) * 37, torch.arange(2**32 - 64, 2**32 + 64),
                         torch.tensor([2**40 + 3, 2**62 + 5, 2**63 - 1])])
    for ours, want in zip(philox4x32(seed, offsets), _oracle_words(seed, offsets)):
        assert torch.equal(ours, want)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.999])
@pytest.mark.parametrize("rows,cols,row_offset", [(37, 33, 0), (3, 4095, 2**29 + 3), (50, 257, 2**32 + 1),
                                                   (9, 1, 2**33 - 4), (4, 8, 0)])
def test_mask_equals_oracle_across_chunks(monkeypatch, p, rows, cols, row_offset):
    """Counters past 2**32 (row_offset * G), odd widths, and row chunks of 1..rows rows: same bits."""
    seed = 2**33 + 5
    want = _oracle_mask(seed, rows, cols, p, row_offset)
    for chunk in (1, 64, 1 << 14):
        monkeypatch.setattr(philox, "_CHUNK", chunk)
        assert torch.equal(dropout_keep_mask(seed, rows, cols, p, row_offset=row_offset), want)
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            got = torch.full((rows, cols), float("nan"), dtype=dtype)
            for r0, r1, keep in philox.keep_mask_chunks(seed, rows, cols, p, dtype=dtype, row_offset=row_offset):
                assert keep.dtype == dtype and keep.shape == (r1 - r0, cols)
                got[r0:r1] = keep
            assert torch.equal(got, want.to(dtype))


def test_tensor_seed_keys_equal_int_keys():
    """CPU tensor seeds are read as ints; other devices keep 0-d tensor keys: same values."""
    for seed in (3, 2**40 + 1, 2**63 - 1):
        ints = philox.round_keys(torch.tensor([seed]))
        assert ints == philox.round_keys(seed)
        assert all(isinstance(k, int) for pair in ints for k in pair)
    offsets = torch.arange(2**32 - 20, 2**32 + 20)
    keys = philox.tensor_round_keys(torch.tensor([2**33 + 5]))  # what a CUDA seed uses, without a sync
    for a, b in zip(philox4x32(None, offsets, keys), _oracle_words(2**33 + 5, offsets)):
        assert torch.equal(a, b)


def test_tensor_and_batch_round_keys_equal_the_int_keys():
    """``tensor_round_keys`` (0-d per round) and ``batch_round_keys`` ([G, 1] per round) hold round_keys' values."""
    seeds = [0, 3, 2**32 - 1, 2**32, 2**40 + 1, 2**63 - 1]
    batch = philox.batch_round_keys(seeds)
    assert len(batch) == 10 and all(k.shape == (len(seeds), 1) for pair in batch for k in pair)
    for j, seed in enumerate(seeds):
        want = philox.round_keys(seed)
        one = philox.tensor_round_keys(torch.tensor([seed]))
        assert all(k.dim() == 0 for pair in one for k in pair)
        assert [(int(a), int(b)) for a, b in one] == want
        assert [(int(a[j, 0]), int(b[j, 0])) for a, b in batch] == want


def test_serial_cpu_restores_thread_count(monkeypatch):
    monkeypatch.setenv("LORA_TRITON_CPU_THREADS", "fewer")
    threads = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="boom"), philox.serial_cpu("cpu"):
        assert torch.get_num_threads() == 1
        raise RuntimeError("boom")
    assert torch.get_num_threads() == threads


def test_thread_helpers_scale_with_operand_size(monkeypatch):
    monkeypatch.setenv("LORA_TRITON_CPU_THREADS", "fewer")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        grain, small = philox._THREAD_GRAIN, philox._TOGGLE_MIN
        for numel, want in ((0, 4), (small - 1, 4), (small, 1), (grain - 1, 1), (2 * grain, 2), (3 * grain + 5, 3),
                            (100 * grain, 4)):
            with philox.few_threads("cpu", numel):
                assert torch.get_num_threads() == want, numel
            assert torch.get_num_threads() == 4
        for numel, want in ((None, 1), (small - 1, 4), (small, 1), (100 * grain, 1)):
            with philox.serial_cpu("cpu", numel):
                assert torch.get_num_threads() == want, numel
            assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(threads)


def test_thread_policy_all_never_toggles_and_auto_follows_the_load(monkeypatch):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        monkeypatch.setenv("LORA_TRITON_CPU_THREADS", "all")
        with philox.serial_cpu("cpu"), philox.few_threads("cpu", philox._TOGGLE_MIN):
            assert torch.get_num_threads() == 4
        monkeypatch.setenv("LORA_TRITON_CPU_THREADS", "auto")
        for load, want in ((0.5, 4), (64.0, 1)):
            monkeypatch.setattr(philox.os, "getloadavg", lambda load=load: (load, load, load))
            monkeypatch.setattr(philox, "_load_seen", [0.0, False])
            with philox.serial_cpu("cpu"):
                assert torch.get_num_threads() == want, load
        monkeypatch.setenv("LORA_TRITON_CPU_THREADS", "sometimes")
        with pytest.raises(ValueError, match="must be one of auto, fewer, all, got 'sometimes'"):
            with philox.serial_cpu("cpu"):
                pass
    finally:
        torch.set_num_threads(threads)


def test_interleaved_mask_iterators_share_the_cached_generator(monkeypatch):
    """Two masks iterated in lockstep on one thread (one cached generator): each has its own bits."""
    monkeypatch.setattr(philox, "_CHUNK", 64)
    want_a, want_b = _oracle_mask(3, 40, 100, 0.1), _oracle_mask(2**40 + 9, 40, 100, 0.5, 7)
    got_a, got_b = [], []
    for (_, _, a), (_, _, b) in zip(philox.keep_mask_chunks(3, 40, 100, 0.1),
                                    philox.keep_mask_chunks(2**40 + 9, 40, 100, 0.5, row_offset=7)):
        got_a.append(a.clone())
        got_b.append(b.clone())
    assert torch.equal(torch.cat(got_a), want_a) and torch.equal(torch.cat(got_b), want_b)
    assert philox.generator(64, "cpu") is philox.generator(10, "cpu")


@pytest.mark.parametrize("seed", ORACLE_SEEDS)
def test_folded_start_equals_general_rounds(seed):
    """Counters below 2**32 with the first rounds' constants folded: the same words as the general rounds."""
    counters = torch.cat([torch.arange(300), torch.randint(0, 2**32, (500,)), torch.tensor([2**32 - 1])])
    gen = philox._Philox(counters.numel(), "cpu")
    keys = philox.round_keys(seed)
    for flip in (False, True):
        general = gen.run(counters, keys, flip16=flip).clone()
        assert torch.equal(gen.run(counters, keys, flip16=flip, below_2_32=True), general)
    for ours, want in zip(general.unbind(-1), _oracle_words(seed, counters)):
        assert torch.equal((ours.to(torch.int64) & 0xFFFFFFFF) ^ 0x80008000, want)


def test_cached_generator_made_in_inference_mode_serves_later_calls():
    """The per-thread generator first made under inference mode still runs outside it (its buffers are
    written in place on every call, which an inference tensor refuses)."""
    philox._cached.__dict__.clear()
    with torch.inference_mode():
        inside = dropout_keep_mask(11, 9, 40, 0.2)
    outside = dropout_keep_mask(11, 9, 40, 0.2)
    assert torch.equal(inside, outside) and torch.equal(outside, _oracle_mask(11, 9, 40, 0.2))
