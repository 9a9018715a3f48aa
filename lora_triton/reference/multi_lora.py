"""Pure-PyTorch twin of ``kernels/multi_lora.py`` (never imports triton).

Same normalized signature: x [T, K]; weight [N, K] or None; bias [N] or None; lora_A [L, R, K];
lora_B [L, N, R]; scalings fp32 [L]; adapter_ids int [T, k] (-1 = none); ranks int [L];
adapter_weights fp32 [T, k] or None.

A grouped matmul without a Python loop over adapters: the (token, slot) pairs are sorted by
adapter, the active adapters ordered by token count (largest first), and their rows laid out
as a padded [adapters, rows, K] block that goes through two bmm's. Rows are taken in chunks
whose adapter set shrinks as the small adapters run out, so a skewed batch (one adapter with
thousands of tokens, many with one) pads at most one chunk per adapter. Ranks are applied by
zeroing the columns of u = x A^T and of B beyond r_a (not by slicing), which also makes garbage in the
padding harmless.
When every active adapter holds the same number of rows (one sequence per adapter, the usual
decode batch) the sorted rows are one [adapters, count, K] block with no padding or masks; when
those rows lie on an affine grid (sequence i on adapter i % L, or a batch grouped by adapter) the block
is a strided view of x and y, with no gathered copy of x and no scatter into y; when that grid holds
every row (a decode step) the deltas are written into y first and the base GEMM accumulates onto
them (``addmm_``, beta=1), so y is not read again after the GEMM. At low skew the
block spans the ids from the first to the last adapter in use, a view of the stacks (a pool with more
slots than a batch uses reads only those).
With one slot per token and x in the compute dtype (fp32, fp64) the LoRA term goes into y with
``index_add_``; otherwise it is summed over slots in fp32 and added once. Rows without an
adapter are never written, so they equal F.linear bit for bit.
The sort ("plan") of the last call is kept and reused for equal ids (``token_plan``).
"""

from __future__ import annotations

import threading
from typing import NamedTuple

import torch

from .philox import few_threads

_CHUNK_ELEMS = 1 << 24  # bound on one padded block's elements (64 MiB in fp32)


def multi_lora_linear(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, ranks, adapter_weights=None, **_):
    t = x.shape[0]
    num, r_max, _ = lora_A.shape
    n = lora_B.shape[1]
    plan = token_plan(adapter_ids, num) if r_max else None
    # The LoRA term is small ops (gathers, two bmm's over [L, c, K]): few threads, as in the training
    # reference, so a loaded machine's descheduled worker does not stall each op's barrier.
    threads = few_threads(x.device, max(lora_A.numel(), lora_B.numel(), x.numel(), t * n))
    if weight is not None and _whole_grid(plan, x, t, adapter_ids.shape[1], n, r_max):
        # Every row on the grid (the decode batch): the deltas are written straight into y and the base GEMM
        # accumulates onto them (beta=1), one pass over y instead of a delta buffer and an add after the GEMM.
        # The bias goes in before the GEMM, as F.linear's addmm puts it: a row whose delta is exactly 0 (rank 0)
        # then equals F.linear bit for bit (added after, it rounds differently once K spans several blocks).
        y = torch.empty((t, n), dtype=x.dtype, device=x.device)
        with threads:
            _add_lora(x, y, lora_A, lora_B, scalings, adapter_ids, ranks, adapter_weights, plan, overwrite=True)
        if bias is not None:
            y.add_(bias)
        return y.addmm_(x, weight.t())
    if weight is None:
        y = x.new_zeros((t, n)) if bias is None else bias.expand(t, n).clone()
    else:
        y = torch.nn.functional.linear(x, weight, bias)
    if plan is None:
        return y
    with threads:
        return _add_lora(x, y, lora_A, lora_B, scalings, adapter_ids, ranks, adapter_weights, plan)


def _whole_grid(plan, x, t: int, k: int, n: int, r_max: int) -> bool:
    """Whether ``_add_lora`` takes ``_grid_block`` for this plan and its grid covers every row of y (so an
    uninitialized y is fully written): one slot per token, each with an adapter, x in the compute dtype."""
    return (plan is not None and plan.grid is not None and k == 1 and plan.sel.numel() == t
            and x.dtype in (torch.float32, torch.float64) and t * max(x.shape[1], n, r_max) <= _CHUNK_ELEMS)


def _add_lora(x, y, lora_A, lora_B, scalings, adapter_ids, ranks, adapter_weights, plan, overwrite=False):
    t, n = y.shape
    num, r_max, _ = lora_A.shape
    k = adapter_ids.shape[1]
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    sel, ad, max_count, by_id, active, act_counts, act_starts, grid, lo = plan
    span = len(active)
    # Each op below is a few microseconds warm but 5-20 with the caches cold after the base GEMM (a
    # decode step's usual state), so no-op casts and full-range slices are skipped, not issued.
    if ranks.device != x.device:
        ranks = ranks.to(x.device)  # once: read per adapter (coefficient, rank limit)
    full = ranks is _FULL_RANKS.get((num, r_max, ranks.device))  # ranks=None: every rank r_max > 0
    scal = scalings if scalings.dtype == cdt else scalings.to(cdt)
    if not full:  # rank <= 0 adds nothing, as in the kernels; per adapter here, per slot below where needed
        scal = torch.where(ranks > 0, scal, 0)
    if by_id:
        # Low skew (the serving norm): rows laid out by adapter id over the ids in use, one padded block,
        # and that range of the adapter stacks as a view, with no per-call copy of A and B.
        a_act, b_act, act_ranks, act_scal = lora_A, lora_B, ranks, scal
        if span != num:
            a_act, b_act = lora_A[lo:lo + span], lora_B[lo:lo + span]
            act_ranks, act_scal = ranks[lo:lo + span], scal[lo:lo + span]
        if a_act.dtype != cdt:
            a_act, b_act = a_act.to(cdt), b_act.to(cdt)
    else:
        a_act, b_act = lora_A[active].to(cdt), lora_B[active].to(cdt)  # [m, R, K], [m, N, R]
        act_ranks = ranks[active]
    direct = k == 1 and y.dtype == cdt  # each row gets one delta: add it straight into y
    drop = None
    if not full:
        b_act, drop = _rank_limited(b_act, act_ranks, r_max)
    equal = by_id and sel.numel() == max_count * span
    if equal and sel.numel() * max(x.shape[1], n, r_max) <= _CHUNK_ELEMS:  # no padding, no masks, one block
        # Row (a, j) of the block is adapter a's: its coefficient is scal[a] unless slots are weighted.
        coef = act_scal[:, None] if adapter_weights is None else (
            act_scal[:, None] * adapter_weights.reshape(-1).to(cdt)[sel].view(span, max_count))
        if grid is not None and direct and x.dtype == cdt:
            return _grid_block(x, y, grid, span, max_count, coef, a_act, b_act, overwrite, drop=drop)
        return _equal_counts(x.to(cdt), y, sel.view(span, max_count), coef, a_act, b_act, t, k, direct, drop=drop)
    coef = scal[ad]
    if adapter_weights is not None:
        coef = coef * adapter_weights.reshape(-1).to(cdt)[sel]
    # Otherwise one output row per (token, slot) pair, written once; k > 1 slots summed afterwards.
    acc = y if direct else torch.zeros((t * k, n), dtype=cdt, device=x.device)
    xc = x.to(cdt)
    rows = max(1, min(max_count, _CHUNK_ELEMS // max(1, span * max(x.shape[1], n, r_max))))
    for c0 in range(0, max_count, rows):  # chunks of rows, not adapters
        # Sorted by count, the adapters still holding rows at c0 form a prefix.
        m = span if by_id or not c0 else int((act_counts > c0).sum())
        offs = c0 + torch.arange(rows, device=x.device)
        ok = offs[None, :] < act_counts[:m, None]  # [m, rows]
        pos = torch.where(ok, act_starts[:m, None] + offs[None, :], 0)
        slot = sel[pos]
        u = torch.bmm(xc[slot // k], a_act[:m].transpose(1, 2))  # [m, rows, R]
        u = u * torch.where(ok, coef[pos], 0)[:, :, None]
        if drop is not None:
            u.masked_fill_(drop[:m], 0)
        delta = torch.bmm(u, b_act[:m].transpose(1, 2))  # [m, rows, N]
        if bool(ok.all()):  # no padding rows (even counts): skip the masked copy of delta
            slot, delta = slot.reshape(-1), delta.reshape(-1, n)
        else:
            slot, delta = slot[ok], delta[ok]
        if direct:
            y.index_add_(0, slot, delta)
        else:
            acc[slot] = delta
    if direct:
        return y
    return _add_slots(y, acc, adapter_ids, sel, t, k, n, cdt)


class Plan(NamedTuple):
    """The (token, slot) pairs with an adapter sorted by adapter, and the adapters' row layout."""
    sel: torch.Tensor  # slots j = token * k + c, sorted by adapter (stable)
    ad: torch.Tensor  # their adapters
    max_count: int
    by_id: bool  # rows laid out by adapter id (low skew) rather than by count
    # adapters in layout order: by_id, the id range from the first to the last adapter in use (a pool
    # with more slots than the batch uses reads only that range); else those in use, by count
    active: torch.Tensor
    act_counts: torch.Tensor  # slots of each of them
    act_starts: torch.Tensor  # the first position of each of them in sel
    # (first, adapter step, row step) when every adapter holds max_count slots at slot
    # first + a * adapter_step + j * row_step (a decode batch with sequence i on adapter i % L, or one
    # already grouped by adapter): the block is a strided view of x and y, no gather, no scatter.
    grid: tuple[int, int, int] | None
    lo: int  # the first adapter in use


# The last plan: every layer of one forward (and every decode step of one batch) sees the same ids.
_LAST_PLAN: tuple | None = None


def token_plan(adapter_ids, num: int) -> Plan | None:
    """The ``Plan`` of these ids, or None when no slot has an adapter.

    On CPU the last plan is kept and reused when the ids are equal (a T-element compare instead of the
    sort), so a model's layers sort the batch once per forward. The entry holds its own copy of the ids
    and is replaced in one assignment, so concurrent callers at worst recompute.
    """
    global _LAST_PLAN
    cpu = adapter_ids.is_cpu
    hit = _LAST_PLAN if cpu else None
    if hit is not None and hit[1] == num and hit[0].shape == adapter_ids.shape and torch.equal(hit[0], adapter_ids):
        return hit[2]
    plan = _sort_tokens(adapter_ids, num)
    if cpu:
        _LAST_PLAN = (adapter_ids.clone(), num, plan)
    return plan


def _sort_tokens(adapter_ids, num: int) -> Plan | None:
    flat = adapter_ids.reshape(-1).to(torch.int64)
    sel = torch.nonzero((flat >= 0) & (flat < num)).flatten()  # slots j = token * k + c with an adapter
    if sel.numel() == 0 or num == 0:
        return None
    ad = flat[sel]
    order = torch.argsort(ad, stable=True)
    sel, ad = sel[order], ad[order]
    counts = torch.bincount(ad, minlength=num)
    starts = torch.cumsum(counts, 0) - counts
    max_count = int(counts.max())
    used = torch.nonzero(counts).flatten()
    lo, span = int(used[0]), int(used[-1]) + 1 - int(used[0])
    by_id = max_count * span <= 2 * sel.numel()
    if by_id:
        active = torch.arange(lo, lo + span, device=adapter_ids.device)
    else:
        active = used[torch.argsort(counts[used], descending=True, stable=True)]
    grid = _grid(sel, span, max_count) if by_id and sel.numel() == max_count * span else None
    return Plan(sel, ad, max_count, by_id, active, counts[active], starts[active], grid, lo)


def _grid(sel, num: int, count: int) -> tuple[int, int, int] | None:
    """(first, adapter step, row step) when the [num, count] block of sorted slots is that affine grid with
    positive steps (so its rows are a strided view, each slot once), else None."""
    block = sel.view(num, count)
    first = int(block[0, 0])
    step_a = int(block[1, 0]) - first if num > 1 else 1
    step_j = int(block[0, 1]) - first if count > 1 else 1
    if step_a <= 0 or step_j <= 0:
        return None
    want = first + step_a * torch.arange(num, device=sel.device)[:, None] + step_j * torch.arange(
        count, device=sel.device)
    return (first, step_a, step_j) if torch.equal(block, want) else None


_FULL_RANKS: dict = {}


def full_ranks(num: int, r_max: int, device) -> torch.Tensor:
    """ranks=None as a tensor ([L] of r_max, int32), one per (L, r_max, device) and shared by the calls,
    which only read it: no torch.full per decode step, and by identity this reference knows every rank
    is full (no rank mask, no rank <= 0 test), each op of which costs 5-20 us with caches cold."""
    key = (num, r_max, torch.device(device))
    hit = _FULL_RANKS.get(key)
    if hit is None:
        if len(_FULL_RANKS) >= 64:
            _FULL_RANKS.clear()
        hit = _FULL_RANKS[key] = _kept(torch.full, (num,), r_max, dtype=torch.int32, device=device)
    return hit


def _kept(make, *args, **kwargs) -> torch.Tensor:
    """``make(*args, **kwargs)`` for a tensor kept across calls: made outside inference mode, so a later
    call without it may still write it in place or save it for backward (an inference tensor may not)."""
    if not torch.is_inference_mode_enabled():
        return make(*args, **kwargs)
    with torch.inference_mode(False):
        return make(*args, **kwargs)


def _rank_limited(b_act, act_ranks, r_max: int):
    """(B with columns beyond each adapter's rank zeroed, the [m, 1, R] mask of those columns or None) when a
    rank is below r_max; else (B, None). A's rows beyond rank are not copied: the columns of u = x A^T they
    make are zeroed instead (``masked_fill_``, so NaN there is dropped), a [m, c, R] block rather than a
    pass over A (16 adapters r_max=32, K=4096, one thread: a where over A took 1-4 ms)."""
    if not bool((act_ranks < r_max).any()):
        return b_act, None
    drop = torch.arange(r_max, device=b_act.device)[None, :] >= act_ranks[:, None]  # [m, R]
    # where with a tensor zero, not a Python 0: the scalar form ran 3.9 ms against 1.0 on 8 MiB (measured);
    # where, not *, as padding may hold NaN
    return torch.where(drop[:, None, :], b_act.new_zeros(()), b_act), drop[:, None, :]


def _grid_block(x, y, grid, num: int, count: int, coef, a_act, b_act, overwrite: bool = False, *, drop=None):
    """The equal-count block when its rows form a ``Plan.grid``: x's rows read and y's rows updated through
    strided [L, c, .] views (no gathered copy of x, no index_add_). ``overwrite``: the deltas are written
    into y's rows (the base GEMM adds onto them next); else added, by baddbmm_ when the rows are one
    contiguous block, otherwise through a reused scratch buffer and one add."""
    first, step_a, step_j = grid
    kdim, n = x.shape[1], y.shape[1]
    (xr, xc), (yr, yc) = x.stride(), y.stride()
    xv = x.as_strided((num, count, kdim), (step_a * xr, step_j * xr, xc), x.storage_offset() + first * xr)
    u = _shrink(xv, a_act, coef, drop)
    yv = y.as_strided((num, count, n), (step_a * yr, step_j * yr, yc), y.storage_offset() + first * yr)
    if overwrite and (yv.is_contiguous() or torch.get_num_threads() == 1):
        # Into y's rows; strided rows make bmm run one GEMM per adapter (ldc = the row step): on one thread
        # that beats a delta buffer and a copy (0.40 vs 0.51 ms at T=64, 0.75 vs 0.98 at T=256, K=N=4096,
        # 16 adapters r=16), but each GEMM is its own parallel region, which on two shared cores waits for
        # a descheduled worker (p80 over 100 ms, measured): with more threads, the buffer and one copy.
        torch.bmm(u, b_act.transpose(1, 2), out=yv)
    elif overwrite:
        yv.copy_(_expand(u, b_act))
    elif yv.is_contiguous():  # grouped rows: the GEMM adds into y itself (as cheap as the bare bmm, measured)
        yv.baddbmm_(u, b_act.transpose(1, 2))
    else:  # strided rows: baddbmm_ would copy y's rows out and back; a delta in scratch and one add cost less
        yv.add_(_expand(u, b_act))
    return y


def _equal_counts(xc, y, slots, coef, a_act, b_act, t: int, k: int, direct: bool, *, drop=None):
    """slots [L, c] (sorted by adapter), coef [L, c] or [L, 1]: two bmm's over the [L, c, K] block of their
    rows."""
    num, count = slots.shape
    n, kdim = y.shape[1], xc.shape[1]
    rows = slots.reshape(-1) if k == 1 else slots.reshape(-1) // k
    xg = torch.index_select(xc, 0, rows, out=_scratch(0, rows.numel() * kdim, xc).view(-1, kdim))
    u = _shrink(xg.view(num, count, kdim), a_act, coef, drop)
    delta = _expand(u, b_act).view(-1, n)  # [L * c, N]
    if direct:
        return y.index_add_(0, rows, delta)
    acc = torch.zeros((t * k, n), dtype=delta.dtype, device=y.device)
    acc[slots.reshape(-1)] = delta
    return _add_slots(y, acc, None, slots, t, k, n, delta.dtype)


def _shrink(xv, a_act, coef, drop):
    """u = x A^T [L, c, R] of an equal-count block xv [L, c, K], times coef [L, c] or [L, 1], with the columns
    beyond each adapter's rank zeroed (``drop``, from ``_rank_limited``) when there is a mask."""
    u = torch.bmm(xv, a_act.transpose(1, 2))
    u.mul_(coef[:, :, None])
    if drop is not None:
        u.masked_fill_(drop, 0)
    return u


def _expand(u, b_act):
    """u B^T [L, c, N] in this thread's reused delta buffer (``_scratch`` slot 1): valid until the next call."""
    num, count, n = u.shape[0], u.shape[1], b_act.shape[1]
    return torch.bmm(u, b_act.transpose(1, 2), out=_scratch(1, num * count * n, u).view(num, count, n))


_WORKSPACE = threading.local()
# Per thread and dtype, the largest scratch buffer kept between calls (elements; 32 MiB in fp32).
_WORKSPACE_MAX = 1 << 23


def _scratch(slot: int, numel: int, like: torch.Tensor) -> torch.Tensor:
    """A flat buffer reused across calls on CPU (slot 0: gathered rows, 1: deltas). Fresh multi-MB
    temporaries page-fault on every decode step (measured: 3.3 ms of a 5.3 ms LoRA term at T=256, K=N=4096,
    16 adapters); elsewhere, or above ``_WORKSPACE_MAX``, plain fresh memory. Never returned to a caller."""
    if like.device.type != "cpu" or numel > _WORKSPACE_MAX:
        return torch.empty(numel, dtype=like.dtype, device=like.device)
    bufs = _WORKSPACE.__dict__.setdefault("bufs", {})
    buf = bufs.get((slot, like.dtype))
    if buf is None or buf.numel() < numel:
        buf = bufs[(slot, like.dtype)] = _kept(torch.empty, numel, dtype=like.dtype)
    return buf[:numel]


def _add_slots(y, acc, adapter_ids, sel, t: int, k: int, n: int, cdt):
    """y + the per-(token, slot) rows of acc summed over slots, in the compute dtype, rows with no adapter
    untouched."""
    acc = acc.view(t, k, n).sum(1) if k > 1 else acc
    if sel.numel() == t * k and y.dtype == cdt:  # every slot used: one in-place add
        return y.add_(acc)
    if adapter_ids is None:  # every adapter in sel: rows holding at least one
        touched = torch.unique(sel.reshape(-1) // k)
    else:
        touched = torch.nonzero((adapter_ids >= 0).any(1)).flatten()
    y[touched] = (y[touched].to(cdt) + acc[touched]).to(y.dtype)
    return y
