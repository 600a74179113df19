"""The fused LSTM/GRU engine (irnn.engine.fused_gates) against nn.LSTM / nn.GRU and its own reference path.

The C++ extension is built once on first use (about a minute); everything else is fast. Set
IRNN_NO_EXTENSION=1 to run only the pure-PyTorch path.
"""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from irnn.config import Config
from irnn.engine import TrainStep, fused_gates, make_forward, make_train_step, resolve_engine
from irnn.models import build_model

NO_EXTENSION = os.environ.get("IRNN_NO_EXTENSION", "") not in ("", "0")
IMPLS = ["python"] if NO_EXTENSION else ["cpp", "python"]
MODULES = {"lstm": nn.LSTM, "gru": nn.GRU}
needs_cpp = pytest.mark.skipif(NO_EXTENSION, reason="IRNN_NO_EXTENSION is set")


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread unless a test says otherwise (a loaded 2-core machine makes OpenMP barriers slow)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def weights(mode, n_models, hidden, inputs, dtype=torch.float64, seed=0):
    """Random (w_ih, w_hh, b_ih, b_hh) of one layer, stacked if n_models, like nn.LSTM/GRU's init."""
    g = torch.Generator().manual_seed(seed)
    lead = (n_models,) if n_models else ()
    gates = 4 if mode == "lstm" else 3
    bound = hidden ** -0.5
    shapes = [(gates * hidden, inputs), (gates * hidden, hidden), (gates * hidden,), (gates * hidden,)]
    return [((torch.rand(*lead, *s, generator=g, dtype=dtype) * 2 - 1) * bound).requires_grad_() for s in shapes]


def module(mode, inputs, hidden, layers=1, dtype=torch.float64, seed=0, batch_first=True):
    torch.manual_seed(seed)
    return MODULES[mode](inputs, hidden, layers, batch_first=batch_first).to(dtype)


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


# ------------------------------------------------------------------------------------------------
@needs_cpp
def test_extension_builds():
    assert fused_gates.available(), "the C++ extension did not build; see the warning above"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("shape", [(3, 5, 2, 4), (2, 4, 11, 7), (1, 1, 1, 1), (9, 2, 3, 17)])  # B, T, I, H
def test_gradcheck(impl, mode, shape):
    # I = 11 > 8: a separate input product; B = 9: two row groups (8 + 1); H = 17: a partial last vector.
    b, t, i, h = shape
    x = torch.randn(b, t, i, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    params = weights(mode, 0, h, i, seed=2)
    assert torch.autograd.gradcheck(lambda *a: fused_gates.gates_layer(*a, mode=mode, impl=impl), (x, *params),
                                    eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("last_only", [False, True])
def test_gradcheck_stacked(impl, mode, last_only):
    x = torch.rand(2, 9, 3, 3, dtype=torch.float64).requires_grad_()  # N=2 models, B=9: groups of 8 + 1
    params = weights(mode, 2, 6, 3, seed=3)
    assert torch.autograd.gradcheck(
        lambda *a: fused_gates.gates_layer(*a, mode=mode, impl=impl, last_only=last_only), (x, *params),
        eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_gradcheck_two_layers(impl, mode):
    rnn = module(mode, 2, 5, layers=2)
    x = torch.randn(3, 4, 2, dtype=torch.float64).requires_grad_()
    params = [p.detach().clone().requires_grad_() for p in rnn.parameters()]  # weight_ih_l0, weight_hh_l0, ...
    assert torch.autograd.gradcheck(lambda x, *ps: _functional(rnn, x, ps, impl), (x, *params),
                                    eps=1e-6, atol=1e-7, rtol=1e-5)


def _functional(rnn, x, ps, impl):
    """fused_gates over the layers of rnn with the weights ps (in named_parameters order)."""
    mode = "lstm" if isinstance(rnn, nn.LSTM) else "gru"
    out = x
    for layer in range(rnn.num_layers):
        out = fused_gates.gates_layer(out, *ps[4 * layer:4 * layer + 4], mode=mode, impl=impl)
    return out


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("batch,seq_len,inputs,hidden,layers", [(4, 7, 2, 10, 1), (17, 5, 12, 20, 2), (1, 30, 1, 33, 1)])
def test_matches_the_module(impl, mode, batch, seq_len, inputs, hidden, layers):
    """Outputs and every gradient equal nn.LSTM / nn.GRU's in float64."""
    rnn = module(mode, inputs, hidden, layers, seed=batch)
    x = torch.randn(batch, seq_len, inputs, dtype=torch.float64).requires_grad_()
    ref = rnn(x)[0]
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, [x, *rnn.parameters()], g)
    out = fused_gates.gates_forward(rnn, x, impl=impl)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-13)
    for got, want in zip(torch.autograd.grad(out, [x, *rnn.parameters()], g), ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def _random_shapes(n, seed=2026):
    """n seeded (mode, B, T, I, H, layers, batch_first, last_only, dtype) draws, replayable from the seed."""
    g = torch.Generator().manual_seed(seed)
    pick = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=g))  # noqa: E731
    return [("lstm" if pick(0, 1) else "gru", pick(1, 40), pick(1, 60), pick(1, 20), pick(1, 70), pick(1, 3),
             bool(pick(0, 1)), bool(pick(0, 1)), torch.float32 if pick(0, 1) else torch.float64) for _ in range(n)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", _random_shapes(20), ids=lambda c: "-".join(map(str, c[:8])) + "-" + str(c[8]).split(".")[-1])
def test_random_shapes_match_float64_torch(impl, case):
    """Shapes nobody chose: outputs and every gradient against a float64 nn.LSTM / nn.GRU on the same weights."""
    mode, b, t, i, h, layers, batch_first, last_only, dtype = case
    rnn64 = module(mode, i, h, layers, seed=b * t, batch_first=batch_first)
    rnn = module(mode, i, h, layers, dtype=dtype, seed=b * t, batch_first=batch_first)
    x64 = torch.randn(b, t, i, dtype=torch.float64, generator=torch.Generator().manual_seed(h))
    x64 = (x64 if batch_first else x64.transpose(0, 1).contiguous()).requires_grad_()
    x = x64.detach().to(dtype).requires_grad_()
    ref = rnn64(x64)[0]
    ref = ref[:, -1] if last_only and batch_first else ref[-1] if last_only else ref
    g = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
    want = [ref, *torch.autograd.grad(ref, [x64, *rnn64.parameters()], g)]
    out = fused_gates.gates_forward(rnn, x, impl=impl, last_only=last_only)
    got = [out, *torch.autograd.grad(out, [x, *rnn.parameters()], g.to(dtype))]
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    for name, a, w in zip(["output", "x", *(n for n, _ in rnn.named_parameters())], got, want):
        assert a.shape == w.shape, name
        assert rel_err(a.double(), w) < tol, (name, rel_err(a.double(), w))


@needs_cpp
@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_float32_long_sequence_gradient_error(mode):
    """float32 at T = 400 stays within 1e-4 (relative norm) of a float64 nn.LSTM / nn.GRU, like nn.* in float32."""
    rnn64 = module(mode, 2, 64, seed=5)
    rnn32 = module(mode, 2, 64, dtype=torch.float32, seed=5)
    rnn32.load_state_dict({k: v.float() for k, v in rnn64.state_dict().items()})
    x64 = torch.rand(8, 400, 2, dtype=torch.float64)
    x64[..., 1] = (x64[..., 1] > 0.99).double()  # adding-problem-like inputs
    out64 = rnn64(x64)[0]
    g64 = torch.randn_like(out64) / out64.numel() ** 0.5
    want = torch.autograd.grad(out64, list(rnn64.parameters()), g64)
    out32 = fused_gates.gates_forward(rnn32, x64.float(), impl="cpp")
    got = torch.autograd.grad(out32, list(rnn32.parameters()), g64.float())
    assert rel_err(out32.double(), out64) < 1e-5
    errors = [rel_err(a.double(), b) for a, b in zip(got, want)]
    assert max(errors) < 1e-4, errors


@needs_cpp
@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_equals_the_reference_path(mode, dtype):
    x = torch.randn(2, 20, 6, 11, dtype=dtype).requires_grad_()  # stacked, I = 11: the separate input product
    params = [p.detach().to(dtype).requires_grad_() for p in weights(mode, 2, 13, 11, seed=4)]
    outs, grads = [], []
    for impl in ("cpp", "python"):
        out = fused_gates.gates_layer(x, *params, mode=mode, impl=impl)
        outs.append(out)
        grads.append(torch.autograd.grad(out, [x, *params], torch.ones_like(out)))
    if dtype == torch.float32:  # sums of 120 rows with cancellation: compare by norm
        assert rel_err(outs[0], outs[1]) < 1e-6
        assert max(rel_err(a, b) for a, b in zip(*grads)) < 1e-5
    else:
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-13)
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_stacked_equals_separate(impl, mode):
    n_models = 3
    x = torch.randn(n_models, 5, 6, 2, dtype=torch.float64)
    params = weights(mode, n_models, 7, 2, seed=6)
    out = fused_gates.gates_layer(x, *params, mode=mode, impl=impl)
    grads = torch.autograd.grad(out.pow(2).sum(), params)
    for k in range(n_models):
        one = [p[k].detach().requires_grad_() for p in params]
        out_k = fused_gates.gates_layer(x[k], *one, mode=mode, impl=impl)
        torch.testing.assert_close(out[k], out_k, rtol=0, atol=1e-14)
        for g, g_k in zip(grads, torch.autograd.grad(out_k.pow(2).sum(), one)):
            torch.testing.assert_close(g[k], g_k, rtol=1e-12, atol=1e-14)


def _run_all(mode, x, params, need_x=True):
    out = fused_gates.gates_layer(x, *params, mode=mode, impl="cpp")
    g = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    inputs = [x, *params] if need_x else params
    return [out.detach(), *torch.autograd.grad(out, inputs, g)]


@needs_cpp
@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("shape", [(32, 2), (20, 11)])  # (B, I): 2 groups of 16; 12 + 8 rows with a wide input
def test_bitwise_identical_for_any_thread_count(mode, shape):
    batch, inputs = shape
    x = torch.randn(2, batch, 12, inputs).requires_grad_()  # 2 models: 4 groups
    params = [p.detach().float().requires_grad_() for p in weights(mode, 2, 24, inputs, seed=7)]
    results = {}
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        results[threads] = _run_all(mode, x, params)
    for threads in (2, 3):
        for a, b in zip(results[1], results[threads]):
            assert torch.equal(a, b), f"{threads} threads differ from 1"


@needs_cpp
def test_worker_threads_flush_denormals_like_the_caller():
    # dx = dA W_ih with a subnormal W_ih. Under torch.set_flush_denormal(True) (DAZ and FTZ) every
    # thread (group 2 runs on a worker when there are 2 threads) must flush them to zero.
    x = torch.randn(32, 6, 2).requires_grad_()
    params = [p.detach().float().requires_grad_() for p in weights("lstm", 0, 16, 2, seed=8)]
    with torch.no_grad():
        params[0].mul_(0).add_(1e-40)  # subnormal itself
    before = torch.get_num_threads()
    try:
        assert torch.set_flush_denormal(True)
        dx = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            dx[threads] = _run_all("lstm", x, params)[1]
        assert torch.equal(dx[1], dx[2]) and not dx[2].any()
        torch.set_flush_denormal(False)
        assert _run_all("lstm", x, params)[1].any()  # without flushing they are there
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(before)


@needs_cpp
@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_every_instruction_set_agrees(isa, monkeypatch):
    best = {1: "generic", 2: "avx2", 3: "avx512"}[torch.ops.irnn_gates.best_isa()]
    if ["generic", "avx2", "avx512"].index(isa) > ["generic", "avx2", "avx512"].index(best):
        pytest.skip(f"this CPU has no {isa}")
    x = torch.randn(9, 7, 3, dtype=torch.float64).requires_grad_()
    for mode in ("lstm", "gru"):
        params = weights(mode, 0, 21, 3, seed=9)
        monkeypatch.setenv("IRNN_FUSED_ISA", isa)
        got = _run_all(mode, x, params)
        monkeypatch.setenv("IRNN_FUSED_ISA", "generic")
        want = _run_all(mode, x, params)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_grad_forward_and_last_only(impl):
    rnn = module("lstm", 2, 8)
    x = torch.randn(3, 5, 2, dtype=torch.float64)
    with torch.no_grad():
        full = fused_gates.gates_forward(rnn, x, impl=impl)
        last = fused_gates.gates_forward(rnn, x, impl=impl, last_only=True)
    torch.testing.assert_close(full, rnn(x)[0].detach(), rtol=1e-12, atol=1e-13)
    assert torch.equal(last, full[:, -1])


def test_time_major_module_gradients_land_in_the_module():
    rnn = module("gru", 3, 6, layers=2, batch_first=False)
    x = torch.randn(7, 4, 3, dtype=torch.float64)  # [T, B, I]
    out = fused_gates.gates_forward(rnn, x)
    ref = rnn(x)[0]
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-13)
    out.sum().backward()
    mine = [p.grad.clone() for p in rnn.parameters()]
    rnn.zero_grad()
    ref.sum().backward()
    for a, p in zip(mine, rnn.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("make", [lambda: nn.LSTM(2, 4, bidirectional=True), lambda: nn.GRU(2, 4, bias=False),
                                  lambda: nn.LSTM(2, 4, 2, dropout=0.5), lambda: nn.LSTM(2, 4, proj_size=2),
                                  lambda: nn.RNN(2, 4)])
def test_unsupported_modules(make):
    rnn = make()
    assert not fused_gates.supports(rnn)
    with pytest.raises(ValueError, match="fused gates engine runs only"):
        fused_gates.gates_forward(rnn, torch.randn(2, 3, 2))


def test_bad_arguments():
    params = weights("lstm", 0, 4, 2)
    x = torch.randn(2, 3, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="mode must be one of"):
        fused_gates.gates_layer(x, *params, mode="rnn")
    with pytest.raises(ValueError, match="for a gru layer"):
        fused_gates.gates_layer(x, *params, mode="gru")
    with pytest.raises(ValueError, match="share one dtype"):
        fused_gates.gates_layer(x.float(), *params)
    with pytest.raises(ValueError, match="impl must be one of"):
        fused_gates.gates_layer(x, *params, impl="fast")


def test_no_extension_env_falls_back(monkeypatch):
    monkeypatch.setenv("IRNN_NO_EXTENSION", "1")
    assert not fused_gates.available()
    rnn = module("lstm", 2, 5)
    x = torch.randn(2, 4, 2, dtype=torch.float64)
    torch.testing.assert_close(fused_gates.gates_forward(rnn, x), rnn(x)[0], rtol=1e-12, atol=1e-13)
    with pytest.raises(RuntimeError, match="impl='cpp'"):
        fused_gates.gates_forward(rnn, x, impl="cpp")


# ------------------------------------------------------------------------------------------------
# The engine wiring: engine=auto picks the fused path for LSTMs and GRUs on the CPU.
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_auto_engine_picks_fused_and_trains_like_torch(kind):
    cfg = Config(model=kind, hidden_size=12, num_layers=2)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(build_model(cfg, 2, 1).double())
    engine = resolve_engine("auto", models[0], torch.device("cpu"))
    assert engine == ("torch" if NO_EXTENSION else "fused")
    x, y = torch.randn(5, 9, 2, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
    torch.testing.assert_close(make_forward(models[0], "fused")(x), models[0](x), rtol=1e-12, atol=1e-13)
    losses = []
    for model, eng in zip(models, ["fused", "torch"]):
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        step = make_train_step(model, eng, torch.nn.functional.mse_loss, opt, 1.0, (x, y))
        assert isinstance(step, TrainStep)
        losses.append([step(x, y)[0].item() for _ in range(3)])
    assert losses[0] == pytest.approx(losses[1], rel=1e-10)
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
