"""The eager fast path (ops/eager.py): plain eager calls skip the torch.library custom ops and give the
very same bits, outputs and every gradient; tracing, dispatch modes and ``LORA_TRITON_EAGER=0`` keep
the custom ops, and torch.compile still captures them."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from twice_rule import fp16_matmul_ok

import lora_triton as lt
from lora_triton.ops import eager
from lora_triton.ops.grouped import lora_linear_grouped
from lora_triton.ops.lora_linear import lora_linear

DTYPES = [torch.float32, pytest.param(torch.float16, marks=pytest.mark.skipif(
    not fp16_matmul_ok(), reason="no fp16 matmul on this CPU"))]


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("LORA_TRITON_BACKEND", "reference")


class _Subclass(torch.Tensor):
    pass


class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func))
        return func(*args, **(kwargs or {}))


def _operands(m, k, n, r, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype)
    return dict(x=rnd(2, m, k), w=rnd(n, k) / k**0.5, b=rnd(n) if bias else None, a=rnd(r, k).float() / k**0.5,
                bb=rnd(n, r).float() / r**0.5, dy=rnd(2, m, n))


def _single(c, p, seed, weight=True):
    """y, dx, dA, dB (and dW, db where they require grad) of one lora_linear call."""
    x, a, bb = (c[k].detach().requires_grad_() for k in ("x", "a", "bb"))
    w = c["w"].detach().requires_grad_() if weight == "trainable" else (c["w"] if weight else None)
    b = None if c["b"] is None else (c["b"].detach().requires_grad_() if weight == "trainable" else c["b"])
    y = lora_linear(x, w, b, a, bb, 1.5, p, seed)
    leaves = [t for t in (x, a, bb, w, b) if t is not None and t.requires_grad]
    return [y.detach(), *torch.autograd.grad(y, leaves, c["dy"])], y


def _nodes(y) -> str:
    """Names of y's autograd node and its inputs' nodes."""
    nodes = [y.grad_fn] + [f for f, _ in y.grad_fn.next_functions if f is not None]
    return " ".join(type(n).__name__ for n in nodes)


def _assert_bits(got, expected):
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected)):
        assert a.dtype == b.dtype and a.shape == b.shape, i
        assert torch.equal(a, b), f"tensor {i} differs"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("weight", [True, False, "trainable"])
def test_fast_path_equals_custom_op_bit_for_bit(monkeypatch, dtype, p, bias, weight):
    c = _operands(37, 70, 45, 5, dtype, bias)
    fast, y = _single(c, p, 12345, weight)
    assert "_EagerLoraLinear" in _nodes(y)
    monkeypatch.setenv("LORA_TRITON_EAGER", "0")
    slow, y = _single(c, p, 12345, weight)
    assert "_EagerLoraLinear" not in _nodes(y)
    _assert_bits(fast, slow)


def test_drawn_seeds_are_the_custom_ops_draws(monkeypatch):
    # seed=None: both paths draw from torch's generator the same way, so the masks (and grads) agree.
    c = _operands(16, 40, 24, 4, torch.float32, True, seed=3)
    torch.manual_seed(11)
    fast = [_single(c, 0.4, None)[0] for _ in range(2)]
    monkeypatch.setenv("LORA_TRITON_EAGER", "0")
    torch.manual_seed(11)
    slow = [_single(c, 0.4, None)[0] for _ in range(2)]
    assert not torch.equal(fast[0][0], fast[1][0])  # fresh seeds per call
    for f, s in zip(fast, slow):
        _assert_bits(f, s)


def test_no_grad_call_equals_custom_op(monkeypatch):
    c = _operands(5, 24, 8, 3, torch.float32, True)
    with torch.no_grad():
        fast = lora_linear(c["x"], c["w"], c["b"], c["a"], c["bb"], 0.5, 0.2, 9)
        monkeypatch.setenv("LORA_TRITON_EAGER", "0")
        slow = lora_linear(c["x"], c["w"], c["b"], c["a"], c["bb"], 0.5, 0.2, 9)
    _assert_bits([fast], [slow])


def _grouped(c, ps, seeds):
    x = c["x"].detach().requires_grad_()
    As = [a.detach().requires_grad_() for a in c["As"]]
    Bs = [b.detach().requires_grad_() for b in c["Bs"]]
    ys = lora_linear_grouped(x, c["ws"], c["bs"], As, Bs, [0.5, 2.0, 1.0], ps, seeds)
    grads = torch.autograd.grad(ys, [x, *As, *Bs], c["dys"])
    return [y.detach() for y in ys] + list(grads), ys


@pytest.mark.parametrize("ps", [(0.0, 0.0, 0.0), (0.2, 0.0, 0.5)])
def test_grouped_fast_path_equals_custom_op_bit_for_bit(monkeypatch, ps):
    g = torch.Generator().manual_seed(5)
    rnd = lambda *s: torch.randn(*s, generator=g)
    m, k, ns, rs = 19, 33, (20, 8, 8), (4, 2, 3)
    c = dict(x=rnd(m, k), ws=[rnd(n, k) for n in ns], bs=[rnd(ns[0]), None, rnd(ns[2])],
             As=[rnd(r, k) for r in rs], Bs=[rnd(n, r) for n, r in zip(ns, rs)], dys=[rnd(m, n) for n in ns])
    fast, ys = _grouped(c, ps, [7, 8, 9])
    assert "_EagerGrouped" in _nodes(ys[0])
    monkeypatch.setenv("LORA_TRITON_EAGER", "0")
    slow, ys = _grouped(c, ps, [7, 8, 9])
    assert "_EagerGrouped" not in _nodes(ys[0])
    _assert_bits(fast, slow)


def test_dispatch_modes_and_the_switch_keep_the_custom_ops(monkeypatch):
    c = _operands(4, 16, 8, 2, torch.float32, True)
    x = c["x"].requires_grad_()
    with _OpNames() as seen:
        lora_linear(x, c["w"], c["b"], c["a"], c["bb"], 1.0, 0.1).sum().backward()
    assert {"lora_triton.lora_linear_fwd.default", "lora_triton.lora_linear_bwd.default",
            "lora_triton.draw_seeds.default"} <= seen.names
    assert eager.fast_path(x, c["w"], None, torch.nn.Parameter(c["a"]))
    assert not eager.fast_path(x, None, c["w"].as_subclass(_Subclass))  # DTensor, FakeTensor, ...
    with torch.device("cpu"):  # a torch function mode
        assert not eager.fast_path(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not eager.fast_path(x)
    monkeypatch.setenv("LORA_TRITON_EAGER", "0")
    assert not eager.fast_path(x)


def test_seed_draws_follow_the_ops_verdict(monkeypatch):
    """Each op decides once: a call that keeps its custom op (here x is a tensor subclass) draws its seeds
    through the draw_seeds op too, a plain call draws them without it; lora_linear and the grouped op alike."""
    from lora_triton.ops import seeds as seeds_mod

    calls = []
    real = seeds_mod._draw_seeds
    monkeypatch.setattr(seeds_mod, "_draw_seeds", lambda *a: calls.append(1) or real(*a))
    c = _operands(4, 16, 8, 2, torch.float32, True)
    grouped = ([c["w"]] * 2, [None, c["b"]], [c["a"]] * 2, [c["bb"]] * 2, [1.0, 1.0], [0.2, 0.2])
    for x in (c["x"], c["x"].as_subclass(_Subclass)):
        lora_linear(x, c["w"], c["b"], c["a"], c["bb"], 1.0, 0.2)
        lora_linear_grouped(x, *grouped)
    assert calls == [1, 1]


def test_compile_still_captures_the_custom_ops():
    torch._dynamo.reset()
    graphs = []

    def capture(gm, _inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    c = _operands(6, 16, 8, 2, torch.float32, True)

    def fn(x):
        (y0, y1) = lora_linear_grouped(x, [c["w"], c["w"]], [None, c["b"]], [c["a"], c["a"]], [c["bb"], c["bb"]],
                                       [1.0, 1.0], [0.2, 0.2])
        return lora_linear(x, c["w"], c["b"], c["a"], c["bb"], 1.0, 0.2) + y0 + y1

    torch.manual_seed(4)
    expected = fn(c["x"])
    torch.manual_seed(4)
    got = torch.compile(fn, backend=capture, fullgraph=True)(c["x"])
    graph = "\n".join(graphs)
    for op in ("lora_linear_fwd", "lora_linear_grouped_fwd", "draw_seeds"):
        assert f"lora_triton.{op}" in graph, op
    _assert_bits([got], [expected])


@pytest.mark.parametrize("grouping", ["on", "auto"])
def test_model_step_equals_custom_op_path(grouping, monkeypatch):
    # A whole injected model, grouped q/k/v and gate/up (on) or not (auto: the CPU reference), with dropout:
    # same loss and gradients.
    from models import model_input, randomize_lora, run, tiny_llama

    monkeypatch.setenv("LORA_TRITON_GROUP", grouping)

    model = tiny_llama()
    lt.inject_lora(model, lt.LoraConfig(r=4, lora_dropout=0.2, lora_bias=True,
                                        target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj",
                                                        "down_proj", "o_proj"]))
    randomize_lora(model)
    model.train()
    inputs = model_input("llama")

    def step():
        torch.manual_seed(2)
        loss = run(model, inputs).float().square().mean()
        params = [p for p in model.parameters() if p.requires_grad]
        return [loss.detach(), *torch.autograd.grad(loss, params)]

    fast = step()
    monkeypatch.setenv("LORA_TRITON_EAGER", "0")
    _assert_bits(fast, step())


def test_eager_backward_keeps_once_differentiable_under_create_graph():
    """The eager backward skips once_differentiable's no_grad block when grad mode is off (a plain backward);
    with create_graph=True it still runs through it: first gradients equal, a second backward is refused."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g, requires_grad=True)
    w, a, b = torch.randn(4, 5, generator=g), torch.randn(2, 5, generator=g), torch.randn(4, 2, generator=g)
    a.requires_grad_()
    v = torch.randn(3, 4, generator=g, requires_grad=True)  # a differentiable upstream gradient
    plain = torch.autograd.grad(lora_linear(x, w, None, a, b, 1.5), [x, a], v)
    twice = torch.autograd.grad(lora_linear(x, w, None, a, b, 1.5), [x, a], v, create_graph=True)
    assert all(torch.equal(u, v) for u, v in zip(plain, twice))
    with pytest.raises(RuntimeError, match="once_differentiable"):
        twice[0].sum().backward()


@pytest.mark.parametrize("raw, expected", [("", True), ("1", True), (" On ", True), ("yes", True), ("0", False),
                                           ("false", False), ("OFF", False), ("no", False)])
def test_eager_env_values(monkeypatch, raw, expected):
    monkeypatch.setenv("LORA_TRITON_EAGER", raw)
    assert eager.enabled() is expected


def test_eager_env_bad_value_names_the_valid_ones(monkeypatch):
    monkeypatch.setenv("LORA_TRITON_EAGER", "sometimes")
    with pytest.raises(ValueError, match="LORA_TRITON_EAGER must be one of 1, true, on, yes, 0, false, off, no; "
                                         "got 'sometimes'"):
        eager.enabled()
