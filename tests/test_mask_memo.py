"""The small-mask memo (reference/mask_memo.py): forward keeps a small CPU mask for its backward, which
takes it; results are bit-identical to regenerating, and the memo stays bounded."""

import pytest
import torch

from lora_triton.ops.lora_linear import lora_linear
from lora_triton.reference import mask_memo, philox


@pytest.fixture(autouse=True)
def _empty_memo():
    mask_memo.clear()
    yield
    mask_memo.clear()


def _step(m, k, n, r, p, seed):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(m, k, generator=g, requires_grad=True)
    w = torch.randn(n, k, generator=g)
    a = torch.randn(r, k, generator=g, requires_grad=True)
    b = torch.randn(n, r, generator=g, requires_grad=True)
    y = lora_linear(x, w, None, a, b, 2.0, p, seed=seed)
    kept = mask_memo.held_bytes()
    grads = torch.autograd.grad(y, [x, a, b], torch.randn(m, n, generator=g))
    return y.detach(), grads, kept


@pytest.mark.parametrize("m,k", [(64, 256), (5, 33), (1, 7)])
def test_forward_keeps_backward_takes_same_bits(monkeypatch, m, k):
    y, grads, kept = _step(m, k, 24, 4, 0.1, seed=77)
    assert kept > 0 and mask_memo.held_bytes() == 0  # taken by the backward
    monkeypatch.setattr(mask_memo, "MAX_BYTES", 0)  # nothing kept: backward regenerates
    y2, grads2, kept2 = _step(m, k, 24, 4, 0.1, seed=77)
    assert kept2 == 0
    assert torch.equal(y, y2) and all(torch.equal(a, b) for a, b in zip(grads, grads2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("m,k", [(64, 256), (3, 13)])
def test_small_mask_path_equals_the_chunk_loop_bit_for_bit(monkeypatch, dtype, m, k):
    """reference/lora_linear's whole-mask path for small CPU masks (``mask_memo.small_mask``) against the
    chunk iterator it bypasses: same outputs and gradients, every bit (fp16 takes the accumulating loop)."""
    from lora_triton.reference import lora_linear as ref

    def run():
        g = torch.Generator().manual_seed(3)
        x = torch.randn(m, k, generator=g).to(dtype).requires_grad_()
        w = torch.randn(9, k, generator=g).to(dtype)
        a = torch.randn(4, k, generator=g).requires_grad_()
        b = torch.randn(9, 4, generator=g).requires_grad_()
        y = lora_linear(x, w, None, a, b, 1.5, 0.3, seed=2**40 + 9)
        return [y.detach(), *torch.autograd.grad(y, [x, a, b], torch.randn(m, 9, generator=g).to(dtype))]

    calls = []
    real = ref.small_mask
    monkeypatch.setattr(ref, "small_mask", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    got = run()
    assert len(calls) == 2 and mask_memo.held_bytes() == 0
    monkeypatch.setattr(ref, "small_mask", lambda *a, **kw: None)  # the chunk loop (nothing kept: backward regenerates)
    want = run()
    assert all(torch.equal(u, v) for u, v in zip(got, want))


def test_small_mask_backward_keeps_the_serial_block_of_a_large_dy(monkeypatch):
    """A small x mask with a wide dy (an lm-head-like N): the backward's rank-r GEMMs and masking run in
    ``serial_cpu``'s one-thread block, as the chunk loop's did, not on every thread."""
    from lora_triton.reference import lora_linear as ref

    if torch.get_num_threads() < 2:
        pytest.skip("needs more than one intra-op thread to tell the block from the rest")
    monkeypatch.setenv("LORA_TRITON_CPU_THREADS", "fewer")  # serial_cpu toggles whatever the load
    seen = []
    real = ref._rank_grads
    monkeypatch.setattr(ref, "_rank_grads", lambda *a: seen.append(torch.get_num_threads()) or real(*a))
    m, k, n = 64, 32, 1 << 13  # x: 2K elements (a small mask); dy: 512K, past philox._TOGGLE_MIN
    assert m * n >= philox._TOGGLE_MIN
    _, _, kept = _step(m, k, n, 2, 0.1, seed=5)
    assert kept > 0 and seen == [1]


def test_large_masks_are_regenerated_not_kept():
    rows = philox.small_mask_counters() // 4 + 1  # K = 32: 4 counters per row, one row past a small mask
    _, _, kept = _step(rows, 32, 8, 2, 0.1, seed=5)
    assert kept == 0


def test_memo_is_bounded_and_taken_masks_equal_regenerated(monkeypatch):
    monkeypatch.setattr(mask_memo, "MAX_BYTES", 3 * 64 * 256 * 4)
    for seed in range(10):  # forwards without a backward (evaluation in train mode)
        for _ in mask_memo.mask_chunks(seed, 64, 256, 0.1, "cpu", torch.float32, keep=True):
            pass
    assert mask_memo.held_bytes() <= mask_memo.MAX_BYTES
    assert len(mask_memo._memo) == 3  # the three newest
    want = next(philox.keep_mask_chunks(9, 64, 256, 0.1, "cpu", torch.float32))[2].clone()
    (r0, r1, hit), = list(mask_memo.mask_chunks(9, 64, 256, 0.1, "cpu", torch.float32, take=True))
    assert (r0, r1) == (0, 64) and torch.equal(hit, want)
    assert len(mask_memo._memo) == 2
    # a different threshold, dtype or row offset is a different mask: not served from the memo
    for args in ((9, 64, 256, 0.2, "cpu", torch.float32), (8, 64, 256, 0.1, "cpu", torch.float16),
                 (8, 64, 256, 0.1, "cpu", torch.float32, 64)):
        (_, _, got), = list(mask_memo.mask_chunks(*args, take=True))
        assert torch.equal(got, next(philox.keep_mask_chunks(*args))[2])
    assert len(mask_memo._memo) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_batches_projection_masks_with_each_seeds_bits(dtype):
    seeds = torch.tensor([2**40 + 3, 11, 2**62 + 5, 7])
    ps = [0.1, 0.0, 0.3, 0.05]
    mask_memo.prefill(seeds, 37, 77, ps, dtype)
    assert len(mask_memo._memo) == 3  # p = 0 draws nothing
    for s, p in zip(seeds.tolist(), ps):
        if p == 0.0:
            continue
        (_, _, got), = list(mask_memo.mask_chunks(s, 37, 77, p, "cpu", dtype, take=True))
        assert torch.equal(got, next(philox.keep_mask_chunks(s, 37, 77, p, "cpu", dtype))[2])
    assert mask_memo.held_bytes() == 0


@pytest.mark.parametrize("cols", [64, 77])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_batch_with_one_threshold_has_each_seeds_bits(cols, dtype):
    """A batch whose masks share p (a forecast step's usual case: the threshold stays a number, the round keys
    are built as tensors) gives every seed its own stream's bits, seeds past 2**32 and up to 2**63 - 1."""
    seeds = [2**63 - 1, 2**40 + 3, 0, 11, 2**32]
    thr = philox.dropout_threshold(0.05)
    mask_memo._draw_batch(seeds, 9, cols, [thr] * len(seeds), dtype)
    assert len(mask_memo._memo) == len(seeds)
    for s in seeds:
        (_, _, got), = list(mask_memo.mask_chunks(s, 9, cols, 0.05, "cpu", dtype, take=True))
        assert got.shape == (9, cols)
        assert torch.equal(got, next(philox.keep_mask_chunks(s, 9, cols, 0.05, "cpu", dtype))[2])
    assert mask_memo.held_bytes() == 0


def test_grouped_op_same_bits_with_and_without_memo(monkeypatch):
    from lora_triton.ops.grouped import lora_linear_grouped

    def run():
        g = torch.Generator().manual_seed(3)
        x = torch.randn(6, 40, generator=g, requires_grad=True)
        ws = [torch.randn(n, 40, generator=g) for n in (24, 8, 8)]
        As = [torch.randn(4, 40, generator=g, requires_grad=True) for _ in ws]
        Bs = [torch.randn(w.shape[0], 4, generator=g, requires_grad=True) for w in ws]
        ys = lora_linear_grouped(x, ws, [None] * 3, As, Bs, [2.0] * 3, [0.1, 0.2, 0.1], seeds=[5, 6, 2**41])
        loss = sum((y * torch.randn(y.shape, generator=g)).sum() for y in ys)
        return [y.detach() for y in ys] + list(torch.autograd.grad(loss, [x, *As, *Bs]))

    kept = run()
    assert mask_memo.held_bytes() == 0
    monkeypatch.setattr(mask_memo, "MAX_BYTES", 0)
    assert all(torch.equal(a, b) for a, b in zip(kept, run()))
