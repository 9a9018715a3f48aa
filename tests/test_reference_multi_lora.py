"""The serving reference's fast paths (equal counts per adapter, index_add_ into y) vs the fp64 loop."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from lora_triton.ops import multi_lora as ops
from lora_triton.reference import multi_lora as ref
from tests import test_multi_lora
from tests.test_multi_lora import check, make


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("LORA_TRITON_BACKEND", "reference")


def _spy(monkeypatch):
    """Calls of the one-block paths: ``direct`` (added into y) per call, the strided one always direct."""
    calls = []
    real, real_grid = ref._equal_counts, ref._grid_block

    def spy(*args, **kwargs):
        calls.append(args[-1])  # direct: added into y with index_add_
        return real(*args, **kwargs)

    def grid_spy(*args, **kwargs):
        calls.append(True)
        return real_grid(*args, **kwargs)

    monkeypatch.setattr(ref, "_equal_counts", spy)
    monkeypatch.setattr(ref, "_grid_block", grid_spy)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("per_adapter", [1, 3])
def test_equal_counts_block(monkeypatch, dtype, per_adapter):
    """Every adapter on the same number of tokens (a decode batch, one sequence per adapter), shuffled."""
    calls = _spy(monkeypatch)
    x, w, b, a, bb, s, _, ranks = make(3 * per_adapter, ranks=(1, 8, 64), dtype=dtype, seed=per_adapter)
    ids = torch.arange(3).repeat_interleave(per_adapter)[torch.randperm(3 * per_adapter)]
    a[0, 1:] = float("nan")  # beyond rank 1: never read
    bb[0, :, 1:] = float("nan")
    y = ops.multi_lora_linear(x, w, b, a, bb, s, ids, ranks)
    check(y, x, w, b, a, bb, s, ids, ranks)
    assert calls == [dtype == torch.float32]


def test_equal_counts_with_slots_and_base_rows(monkeypatch):
    """k = 2 slots, weighted, each adapter in 4 slots, some tokens with no adapter at all."""
    calls = _spy(monkeypatch)
    x, w, b, a, bb, s, _, ranks = make(7, ranks=(4, 4), seed=3, slots=2)
    ids = torch.tensor([[0, 1], [-1, -1], [1, 0], [0, -1], [-1, 1], [-1, -1], [0, 1]])
    weights = torch.rand(ids.shape) + 0.25
    y = ops.multi_lora_linear(x, w, b, a, bb, s, ids, ranks, weights)
    check(y, x, w, b, a, bb, s, ids, ranks, weights)
    assert calls == [False]
    assert torch.equal(y[[1, 5]], F.linear(x, w, b)[[1, 5]])


def test_uneven_counts_add_into_y(monkeypatch):
    """Uneven counts take the padded chunks, adding into y with index_add_ (k = 1, fp32), chunk by chunk."""
    calls = _spy(monkeypatch)
    monkeypatch.setattr(ref, "_CHUNK_ELEMS", 3 * 64)  # a few rows per chunk
    x, w, b, a, bb, s, _, ranks = make(23, ranks=(2, 8, 3), seed=5)
    a[0, 2:], bb[0, :, 2:], a[2, 3:] = float("nan"), float("inf"), float("nan")  # beyond rank: never read
    ids = torch.tensor([0] * 11 + [1] * 6 + [2] * 3 + [-1] * 3)[torch.randperm(23)]
    y = ops.multi_lora_linear(x, w, b, a, bb, s, ids, ranks)
    check(y, x, w, b, a, bb, s, ids, ranks)
    assert calls == []


def test_token_plan_reused_for_equal_ids_only(monkeypatch):
    """Layers of one forward share the sort; other ids, or the same tensor written in place, sort again."""
    sorts = []
    real = ref._sort_tokens
    monkeypatch.setattr(ref, "_sort_tokens", lambda ids, num: sorts.append(1) or real(ids, num))
    monkeypatch.setattr(ref, "_LAST_PLAN", None)
    x, w, b, a, bb, s, _, ranks = make(8, ranks=(2, 8, 3), seed=7)
    ids = torch.tensor([0, 1, 2, 0, 1, 2, -1, 0])
    for _ in range(3):  # three "layers"
        check(ops.multi_lora_linear(x, w, b, a, bb, s, ids.clone(), ranks), x, w, b, a, bb, s, ids, ranks)
    assert len(sorts) == 1
    ids[6] = 1  # in place: the cache holds its own copy, so this is a new batch
    check(ops.multi_lora_linear(x, w, b, a, bb, s, ids, ranks), x, w, b, a, bb, s, ids, ranks)
    a2, bb2 = a[:2].contiguous(), bb[:2].contiguous()  # same ids, fewer adapters: not the same plan
    ids2 = torch.tensor([0, 1, 1, 0, 1, 0, -1, 0])
    check(ops.multi_lora_linear(x, w, b, a2, bb2, s[:2], ids2, ranks[:2]), x, w, b, a2, bb2, s[:2], ids2, ranks[:2])
    assert len(sorts) == 3


def test_scratch_reuse_never_aliases_results(monkeypatch):
    """The equal-count path gathers rows and writes deltas into per-thread buffers reused across calls: the
    outputs of earlier calls stay intact, and equal those of fresh buffers (cap 0) bit for bit."""
    x, w, b, a, bb, s, _, ranks = make(8, ranks=(4, 4), seed=11)
    ids = torch.tensor([0, 1] * 4)
    y1 = ops.multi_lora_linear(x, w, b, a, bb, s, ids, ranks)
    first = y1.clone()
    y2 = ops.multi_lora_linear(x[:4] * 2, None, None, a, bb, s, ids[:4], ranks)  # other shapes, same buffers
    assert torch.equal(y1, first)
    monkeypatch.setattr(ref, "_WORKSPACE_MAX", 0)
    assert torch.equal(ops.multi_lora_linear(x, w, b, a, bb, s, ids, ranks), first)
    assert torch.equal(ops.multi_lora_linear(x[:4] * 2, None, None, a, bb, s, ids[:4], ranks), y2)


def test_buffers_kept_from_an_inference_mode_call_serve_later_calls(monkeypatch):
    """The workspaces and the shared ranks=None tensor are kept across calls: made by a first call under
    torch.inference_mode, they must still take in-place writes and be saved for backward outside it."""
    monkeypatch.setattr(ref, "_WORKSPACE", threading.local())
    monkeypatch.setattr(ref, "_FULL_RANKS", {})
    monkeypatch.setattr(ref, "_LAST_PLAN", None)
    x, w, b, a, bb, s, _, _ = make(8, ranks=(4, 4, 4), seed=12)
    ids = torch.tensor([0, 1, 2, 0, 1, 2, 1, 0])[[0, 3, 7, 1, 4, 6, 2, 5]]  # grouped: a strided grid
    ids_gather = torch.tensor([0, 1, 2, 1, 0, 2])  # equal counts, no grid: the gather workspace
    with torch.inference_mode():
        ops.multi_lora_linear(x, w, b, a, bb, s, ids)
        ops.multi_lora_linear(x[:6], w, b, a, bb, s, ids_gather)
    full = torch.full((3,), 4, dtype=torch.int32)
    check(ops.multi_lora_linear(x, w, b, a, bb, s, ids), x, w, b, a, bb, s, ids, full)
    check(ops.multi_lora_linear(x[:6], w, b, a, bb, s, ids_gather), x[:6], w, b, a, bb, s, ids_gather, full)
    xg = x.clone().requires_grad_(True)
    ops.multi_lora_linear(xg, w, b, a, bb, s, ids).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


def _grid_spy(monkeypatch, record=lambda args: args[2]):
    """Calls of ``_grid_block`` (by default their grid; ``record`` picks from the positional arguments), with
    the plan cache emptied."""
    calls = []
    real = ref._grid_block

    def spy(*args, **kwargs):
        calls.append(record(args))
        return real(*args, **kwargs)

    monkeypatch.setattr(ref, "_grid_block", spy)
    monkeypatch.setattr(ref, "_LAST_PLAN", None)
    return calls


@pytest.mark.parametrize("ids, grid", [
    ([0, 1, 2] * 4, (0, 1, 3)),  # sequence i on adapter i % L: rows a, a + L, ...
    ([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2], (0, 4, 1)),  # already grouped by adapter
    ([-1, 0, 1, 2, -1, 0, 1, 2], (1, 1, 4)),  # rows without an adapter between the groups
    ([0, -1, 1, -1, 2], (0, 2, 1)),  # one row per adapter
])
def test_grid_block_reads_and_writes_strided_views(monkeypatch, ids, grid):
    """Equal counts laid out on an affine grid of rows: x and y through strided views, no gather or scatter,
    equal to the gathered block up to fp32 rounding (bmm may order a strided batch's sums differently),
    and rows without an adapter untouched (``check``)."""
    calls = _grid_spy(monkeypatch)
    t = len(ids)
    wide = make(t, k_in=43, ranks=(2, 8, 5), seed=13)[0]
    x = wide[:, 1:41]  # row stride 43: the views must follow x's strides, not assume contiguity
    _, w, b, a, bb, s, _, ranks = make(t, ranks=(2, 8, 5), seed=13)
    ids = torch.tensor(ids)
    a[0, 2:] = float("nan")  # beyond rank 2: never read
    y = ops.multi_lora_linear(x, w, b, a, bb, s, ids, ranks)
    assert calls == [grid]
    check(y, x, w, b, a, bb, s, ids, ranks)
    monkeypatch.setattr(ref, "_grid", lambda *args: None)  # the gathered [L, c, K] block instead
    monkeypatch.setattr(ref, "_LAST_PLAN", None)
    torch.testing.assert_close(ops.multi_lora_linear(x, w, b, a, bb, s, ids, ranks), y, rtol=1e-6, atol=1e-6)


def test_grid_needs_positive_steps_and_one_slot():
    """Adapter 1's rows before adapter 0's (a negative step), two slots per token or fp16 (no add into y):
    the gathered block, still exact against the fp64 loop."""
    assert ref._sort_tokens(torch.tensor([[1], [0], [1], [0]]), 2).grid is None
    assert ref._sort_tokens(torch.tensor([[0], [1], [0], [1]]), 2).grid == (0, 1, 2)
    assert ref._sort_tokens(torch.tensor([[0], [1], [1], [0]]), 2).grid is None  # not affine
    for ids, dtype in ((torch.tensor([1, 0, 1, 0]), torch.float32), (torch.tensor([0, 1, 0, 1]), torch.float16)):
        x, w, b, a, bb, s, _, ranks = make(4, ranks=(3, 6), dtype=dtype, seed=17)
        check(ops.multi_lora_linear(x, w, b, a, bb, s, ids, ranks), x, w, b, a, bb, s, ids, ranks)
    x, w, b, a, bb, s, _, ranks = make(4, ranks=(3, 6), seed=19, slots=2)
    ids = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0]])
    check(ops.multi_lora_linear(x, w, b, a, bb, s, ids, ranks), x, w, b, a, bb, s, ids, ranks)


def test_block_over_the_ids_in_use_reads_a_view_of_the_stacks(monkeypatch):
    """A pool with more slots than the batch uses (adapters 2..4 of 7, slots 0, 1, 5, 6 holding NaN):
    the block covers only that id range, as a view of the stacks, and never reads the other slots."""
    calls = _grid_spy(monkeypatch)
    x, w, b, a, bb, s, _, ranks = make(6, ranks=(4, 4, 2, 8, 5, 4, 4), seed=23)
    for slot in (0, 1, 5, 6):
        a[slot], bb[slot] = float("nan"), float("nan")
    ids = torch.tensor([2, 3, 4, 2, 3, 4])
    plan = ref._sort_tokens(ids.view(-1, 1), 7)
    assert plan.by_id and plan.lo == 2 and plan.active.tolist() == [2, 3, 4] and plan.grid == (0, 1, 3)
    check(ops.multi_lora_linear(x, w, b, a, bb, s, ids, ranks), x, w, b, a, bb, s, ids, ranks)
    assert calls == [(0, 1, 3)]
    ids = torch.tensor([2, 4, 4, 2, -1, 3])  # uneven: the padded chunks over the same range
    check(ops.multi_lora_linear(x, w, b, a, bb, s, ids, ranks), x, w, b, a, bb, s, ids, ranks)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("ids, dtype, with_bias, want", [  # want: _grid_block's overwrite flag per call
    ([0, 1, 2] * 4, torch.float32, True, [True]),  # sequence i on adapter i % L: strided rows
    ([0, 1, 2] * 4, torch.float64, False, [True]),
    ([0, 0, 1, 1, 2, 2], torch.float32, False, [True]),  # grouped: one contiguous block of rows
    ([2, 0, 1], torch.float32, True, []),  # one row per adapter, adapter order reversed in part: no grid
    ([-1, 0, 1, 2, -1, 0, 1, 2], torch.float32, True, [False]),  # a grid, but rows without an adapter: added after
])
def test_whole_grid_deltas_first_then_the_base_gemm(monkeypatch, threads, ids, dtype, with_bias, want):
    """Every row on the grid: the deltas are written into an uninitialized y (poisoned with NaN here) and the
    base GEMM accumulates onto them; on one thread straight into strided rows, else through a buffer. Rows
    off the grid or a batch with a row lacking an adapter take the add-after path (``check``: fp64 truth,
    base rows bit for bit)."""
    monkeypatch.setitem(test_multi_lora.TOL, torch.float64, 1e-12)
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: real_empty(*a, **kw).fill_(float("nan")))
    modes = _grid_spy(monkeypatch, lambda args: args[-1])  # the overwrite flag
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, w, b, a, bb, s, _, ranks = make(len(ids), ranks=(2, 8, 5), dtype=dtype, seed=29)
        b = b if with_bias else None
        a[0, 2:], bb[0, :, 2:] = float("nan"), float("nan")  # beyond rank 2: never read
        ids = torch.tensor(ids)
        check(ops.multi_lora_linear(x, w, b, a, bb, s, ids, ranks), x, w, b, a, bb, s, ids, ranks)
        grid = ref._sort_tokens(ids.view(-1, 1), 3).grid is not None
        assert modes == ([bool((ids >= 0).all())] if grid else [])
        assert modes == want  # stated, not derived: a grid detection that found none would pass the line above
        ids[1] = -1  # a base row: F.linear first, the deltas added after
        check(ops.multi_lora_linear(x, w, b, a, bb, s, ids, ranks), x, w, b, a, bb, s, ids, ranks)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("ids", [[0, 1, 2] * 4, [0, 0, 1, 1, 2, 2]])
def test_whole_grid_rank_zero_rows_equal_f_linear(ids):
    """A slot of rank 0 adds exactly nothing (an evicted pool slot, a layer an adapter does not target): on the
    deltas-first path too its rows equal F.linear with the bias bit for bit. K = 1024 spans several of the
    GEMM's K blocks, where adding the bias after the GEMM rounds differently."""
    x, w, b, a, bb, s, _, ranks = make(len(ids), k_in=1024, n=64, ranks=(2, 0, 5), seed=31)
    ids = torch.tensor(ids)
    y = ops.multi_lora_linear(x, w, b, a, bb, s, ids, ranks)
    check(y, x, w, b, a, bb, s, ids, ranks)
    zero = ids == 1
    assert torch.equal(y[zero], F.linear(x, w, b)[zero]), "rank-0 rows must equal F.linear bit for bit"
