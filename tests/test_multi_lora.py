"""multi_lora_linear: reference and Triton (interpreter) vs a per-adapter fp64 Python loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lora_triton.ops import multi_lora as ops
from lora_triton.reference import multi_lora as ref

TOL = {torch.float32: 2e-5, torch.float16: 2e-2}


def truth(x, weight, bias, lora_A, lora_B, scalings, ids, ranks=None, weights=None):
    """Ground truth: one token, one slot at a time, in fp64."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k).double()
    ids2 = ids.reshape(x2.shape[0], -1)
    w2 = None if weights is None else weights.reshape(ids2.shape).double()
    y = x2 @ weight.double().t() + (0 if bias is None else bias.double())
    for t in range(x2.shape[0]):
        for c in range(ids2.shape[1]):
            a = int(ids2[t, c])
            if a < 0:
                continue
            r = lora_A.shape[1] if ranks is None else int(ranks[a])
            coef = float(scalings[a]) * (1.0 if w2 is None else float(w2[t, c]))
            y[t] += coef * (lora_B[a, :, :r].double() @ (lora_A[a, :r].double() @ x2[t]))
    return y.reshape(*x.shape[:-1], -1)


def make(t, k_in=40, n=24, ranks=(1, 8, 64), dtype=torch.float32, seed=0, slots=None):
    g = torch.Generator().manual_seed(seed)
    num, r_max = len(ranks), max(ranks)
    x = torch.randn(t, k_in, generator=g).to(dtype)
    w = (torch.randn(n, k_in, generator=g) / k_in**0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    a = (torch.randn(num, r_max, k_in, generator=g) / k_in**0.5).to(dtype)
    bb = (torch.randn(num, n, r_max, generator=g) / r_max**0.5).to(dtype)
    s = torch.rand(num, generator=g) + 0.5
    shape = (t,) if slots is None else (t, slots)
    ids = torch.randint(-1, num, shape, generator=g)
    return x, w, b, a, bb, s, ids, torch.tensor(ranks, dtype=torch.int32)


@pytest.fixture(params=["reference", "triton"])
def backend(request, monkeypatch):
    monkeypatch.setenv("LORA_TRITON_BACKEND", request.param)
    return request.param


def check(y, x, w, b, a, bb, s, ids, ranks, weights=None):
    exp = truth(x, w, b, a, bb, s, ids, ranks, weights)
    tol = TOL[x.dtype]
    torch.testing.assert_close(y.double(), exp, atol=tol, rtol=tol)
    base = F.linear(x, w, b)
    none = (ids.reshape(*x.shape[:-1], -1) < 0).all(-1)
    assert torch.equal(y[none], base[none]), "rows without an adapter must equal F.linear bit for bit"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t", [1, 5, 37])
def test_mixed_ranks(backend, dtype, t):
    x, w, b, a, bb, s, ids, ranks = make(t, dtype=dtype)
    ids[0] = -1 if t > 1 else 2
    y = ops.multi_lora_linear(x, w, b, a, bb, s, ids, ranks)
    check(y, x, w, b, a, bb, s, ids, ranks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_slots_with_weights(backend, dtype):
    x, w, b, a, bb, s, ids, ranks = make(21, dtype=dtype, slots=3, seed=1)
    ids[3] = -1
    weights = torch.rand(ids.shape) * 2 - 0.5
    y = ops.multi_lora_linear(x, w, b, a, bb, s, ids, ranks, weights)
    check(y, x, w, b, a, bb, s, ids, ranks, weights)


def test_one_adapter_for_all(backend):
    x, w, b, a, bb, s, _, ranks = make(33, ranks=(16, 4), seed=2)
    ids = torch.ones(33, dtype=torch.int64)
    check(ops.multi_lora_linear(x, w, None, a, bb, s, ids, ranks), x, w, None, a, bb, s, ids, ranks)


def test_every_token_its_own_adapter(backend):
    ranks = tuple((i % 5) * 4 + 1 for i in range(12))
    x, w, b, a, bb, s, _, rk = make(12, ranks=ranks, seed=3)
    ids = torch.randperm(12)
    check(ops.multi_lora_linear(x, w, b, a, bb, s, ids, rk), x, w, b, a, bb, s, ids, rk)


def test_leading_dims_and_default_ranks(backend):
    x, w, b, a, bb, s, _, _ = make(6, ranks=(8, 8), seed=4)
    x = x.reshape(2, 3, -1)
    ids = torch.tensor([[0, -1, 1], [1, 1, -1]])
    y = ops.multi_lora_linear(x, w, b, a, bb, s, ids)
    assert y.shape == (2, 3, 24)
    check(y, x, w, b, a, bb, s, ids, None)


def test_all_base_rows_bit_equal(backend):
    x, w, b, a, bb, s, _, ranks = make(9, seed=5)
    ids = torch.full((9,), -1)
    assert torch.equal(ops.multi_lora_linear(x, w, b, a, bb, s, ids, ranks), F.linear(x, w, b))


@pytest.mark.parametrize("mode,split_k,block_m", [("fused", None, 16), ("split", 1, 16), ("split", 3, 16),
                                                  ("split", 2, 64)])
def test_kernel_paths(mode, split_k, block_m):
    from lora_triton.kernels import multi_lora as kern
    x, w, b, a, bb, s, ids, ranks = make(29, k_in=130, n=70, seed=6, slots=2)
    ranks[1] = 0  # a rank-0 adapter contributes nothing
    weights = torch.rand(ids.shape)
    y = kern.multi_lora_linear(x, w, b, a, bb, s, ids, ranks, weights, mode=mode, split_k=split_k,
                               block_m=block_m)
    check(y, x, w, b, a, bb, s, ids, ranks, weights)


def test_garbage_in_padding_is_never_read(backend):
    x, w, b, a, bb, s, ids, ranks = make(11, seed=7)
    exp = ops.multi_lora_linear(x, w, b, a, bb, s, ids, ranks)
    for i, r in enumerate(ranks.tolist()):
        a[i, r:] = float("nan")
        bb[i, :, r:] = float("nan")
    assert torch.equal(ops.multi_lora_linear(x, w, b, a, bb, s, ids, ranks), exp)


def test_plan_matches_python():
    from lora_triton.kernels.multi_lora import build_plan
    ids = torch.tensor([[2, -1], [0, 2], [2, 2], [-1, 0], [2, 1]])
    perm, tile_a, row0, rend, nt = build_plan(ids, 3, block_m=2)
    flat = ids.reshape(-1)
    for c in range(2):
        tiles = [(int(tile_a[c * nt + i]), int(row0[c * nt + i]), int(rend[c * nt + i])) for i in range(nt)]
        covered = []
        for a, r0, r1 in tiles:
            if a < 0:
                continue
            rows = perm[r0:min(r1, r0 + 2)].tolist()
            assert all(int(flat[j]) == a and j % 2 == c for j in rows)
            covered += rows
        assert sorted(covered) == [j for j in range(10) if j % 2 == c and flat[j] >= 0]


def test_grad_of_x_and_base(monkeypatch):
    monkeypatch.setenv("LORA_TRITON_BACKEND", "reference")
    x, w, b, a, bb, s, ids, ranks = make(7, seed=8, dtype=torch.float64)
    x.requires_grad_(True)
    w.requires_grad_(True)
    b.requires_grad_(True)
    y = ops.multi_lora_linear(x, w, b, a, bb, s, ids, ranks)
    y.square().sum().backward()
    grads = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    truth(x, w, b, a, bb, s, ids, ranks).square().sum().backward()
    for got, t in zip(grads, (x, w, b)):
        torch.testing.assert_close(got, t.grad)


def test_lora_grad_refused():
    x, w, b, a, bb, s, ids, ranks = make(3)
    with pytest.raises(RuntimeError, match="inference op"):
        ops.multi_lora_linear(x, w, b, a.requires_grad_(True), bb, s, ids, ranks)
    with torch.no_grad():
        ops.multi_lora_linear(x, w, b, a, bb, s, ids, ranks)


def test_fake_impl_and_schema(monkeypatch):
    monkeypatch.setenv("LORA_TRITON_BACKEND", "reference")
    x, w, b, a, bb, s, ids, ranks = make(5)
    args = (x, w, b, a, bb, s.float(), ids.reshape(5, 1), ranks, None)
    torch.library.opcheck(ops._op, args, test_utils=("test_schema", "test_faketensor"))
    from torch._subclasses.fake_tensor import FakeTensorMode
    real = (x.reshape(5, 1, -1), w, b, a, bb, s, ids.reshape(5, 1), ranks)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in real]
        out = ops.multi_lora_linear(*fake, validate=False)
        assert out.shape == (5, 1, 24)


def test_plain_eager_calls_skip_the_custom_op_dispatch(monkeypatch, backend):
    """Eager inference runs the implementation directly, bit-equal to the op; autograd, fake tensors and
    torch-function modes still go through the custom op."""
    x, w, b, a, bb, s, ids, ranks = make(6, seed=21)
    calls = []
    real = ops._op
    monkeypatch.setattr(ops, "_op", lambda *args: calls.append(1) or real(*args))
    with torch.no_grad():
        direct = ops.multi_lora_linear(x, w, b, a, bb, s, ids, ranks)
    assert calls == []
    monkeypatch.setenv("LORA_TRITON_EAGER", "0")  # README: every call through the custom ops, serving's too
    with torch.no_grad():
        assert torch.equal(ops.multi_lora_linear(x, w, b, a, bb, s, ids, ranks), direct)
    assert calls == [1]
    monkeypatch.delenv("LORA_TRITON_EAGER")
    monkeypatch.setattr(ops, "_plain_eager", lambda args: False)
    with torch.no_grad():
        assert torch.equal(ops.multi_lora_linear(x, w, b, a, bb, s, ids, ranks), direct)
    assert calls == [1, 1]
    monkeypatch.undo()
    monkeypatch.setenv("LORA_TRITON_BACKEND", backend)
    xg = x.clone().requires_grad_(True)
    assert not ops._plain_eager((xg, w, b, a, bb, s, ids, ranks, None))
    with torch.no_grad():
        assert ops._plain_eager((xg, w, b, a, bb, s, ids, ranks, None))
    from torch.overrides import TorchFunctionMode
    with TorchFunctionMode():
        assert not ops._plain_eager((x, w, b, a, bb, s, ids, ranks, None))
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        assert not ops._plain_eager(tuple(mode.from_tensor(t) for t in (x, w, b, a, bb, s, ids, ranks)) + (None,))


@pytest.mark.parametrize("bad,match", [
    (dict(ids=torch.tensor([0, 3, 1])), r"\[-1, 2\].*\[0, 3\]"),
    (dict(ids=torch.tensor([0, -2, 1])), r"\[-1, 2\]"),
    (dict(ranks=torch.tensor([1, 65, 8])), r"r_max=64"),
    (dict(ranks=torch.tensor([1, -1, 8])), r"ranks must be in"),
    (dict(ranks=torch.tensor([1, 8])), r"ranks must be \[L=3\]"),
    (dict(ids=torch.tensor([0, 1])), r"adapter_ids must be"),
    (dict(ids=torch.tensor([0.0, 1.0, 1.0])), r"integer tensor"),
    (dict(a=torch.zeros(3, 64, 39)), r"lora_A must be \[L, r_max, in_features=40\]"),
    (dict(bb=torch.zeros(2, 24, 64)), r"lora_B must be \[L=3"),
    (dict(w=torch.zeros(24, 41)), r"weight must be \[out_features=24, in_features=40\]"),
    (dict(w=torch.zeros(24, 40, dtype=torch.float64)), r"weight dtype"),
    (dict(s=torch.ones(2)), r"scalings must be \[L=3\]"),
    (dict(weights=torch.ones(3, 2)), r"adapter_weights must have"),
    (dict(a=torch.zeros(3, 64, 40, device="meta")), r"one device"),
])
def test_validation(bad, match):
    x, w, b, a, bb, s, ids, ranks = make(3)
    ids = torch.tensor([0, 1, 2])
    kw = dict(x=x, w=w, b=b, a=a, bb=bb, s=s, ids=ids, ranks=ranks, weights=None)
    kw.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        ops.multi_lora_linear(kw["x"], kw["w"], kw["b"], kw["a"], kw["bb"], kw["s"], kw["ids"], kw["ranks"],
                              kw["weights"])


def test_validate_false_skips_host_checks(monkeypatch):
    x, w, b, a, bb, s, ids, ranks = make(4)
    calls = []
    monkeypatch.setattr(ops, "check_adapter_ids", lambda *args, **kw: calls.append(1))
    ops.multi_lora_linear(x, w, b, a, bb, s, ids, ranks, validate=False)
    assert not calls
    ops.multi_lora_linear(x, w, b, a, bb, s, ids, ranks)
    assert calls


def test_reference_chunks_skewed_batch(monkeypatch):
    # Force tiny chunks so the shrinking-adapter-set path runs several times.
    monkeypatch.setattr(ref, "_CHUNK_ELEMS", 64 * 3)
    x, w, b, a, bb, s, _, ranks = make(20, seed=9)
    ids = torch.tensor([0] * 14 + [1, 2, 2, -1, 1, 0])
    y = ref.multi_lora_linear(x, w, b, a, bb, s.float(), ids.reshape(-1, 1), ranks)
    check(y, x, w, b, a, bb, s, ids, ranks)


def test_ranks_none_reads_every_rank_through_one_shared_tensor(backend):
    """ranks=None means r_max for every adapter; the [L] tensor standing for it is built once per shape."""
    x, w, b, a, bb, s, ids, _ = make(5, ranks=(8, 8, 8), seed=25)
    full = torch.full((3,), 8, dtype=torch.int32)
    with torch.no_grad():
        y = ops.multi_lora_linear(x, w, b, a, bb, s, ids, None)
    check(y, x, w, b, a, bb, s, ids, full)
    assert ops.full_ranks(3, 8, x.device) is ops.full_ranks(3, 8, x.device)
    assert torch.equal(ops.full_ranks(3, 8, x.device), full)

