"""The fused RNN engine (irnn.engine.fused) against nn.RNN and its own reference path.

The C++ extension is built once per session on first use (about a minute); everything else is fast.
Set IRNN_NO_EXTENSION=1 to run only the pure-PyTorch path.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from irnn.engine import fused

NO_EXTENSION = os.environ.get("IRNN_NO_EXTENSION", "") not in ("", "0")
IMPLS = ["python"] if NO_EXTENSION else ["cpp", "python"]
SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a loaded 2-core machine every OpenMP barrier of a 2-thread run can wait out
    a whole scheduler slice, which makes these small tests take minutes. test_threads_split_rows covers
    the multi-threaded split."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def weights(n_models, hidden, inputs, dtype=torch.float64, seed=0, dead=0):
    """Random (w_ih, w_hh, b_ih, b_hh), stacked if n_models; the first `dead` units get a bias of -5."""
    g = torch.Generator().manual_seed(seed)
    lead = (n_models,) if n_models else ()
    bound = hidden ** -0.5
    w_ih = (torch.rand(*lead, hidden, inputs, generator=g, dtype=dtype) * 2 - 1) * bound
    w_hh = (torch.rand(*lead, hidden, hidden, generator=g, dtype=dtype) * 2 - 1) * bound
    b_ih = (torch.rand(*lead, hidden, generator=g, dtype=dtype) * 2 - 1) * bound
    b_hh = (torch.rand(*lead, hidden, generator=g, dtype=dtype) * 2 - 1) * bound
    b_hh[..., :dead] = -5.0
    return [w.requires_grad_() for w in (w_ih, w_hh, b_ih, b_hh)]


def grads_of(out, tensors, g):
    return torch.autograd.grad(out, tensors, g, retain_graph=True)


# ------------------------------------------------------------------------------------------------
def test_extension_builds():
    if NO_EXTENSION:
        pytest.skip("IRNN_NO_EXTENSION is set")
    assert fused.available(), "the C++ extension did not build; see the warning above"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("nonlinearity", ["relu", "tanh"])
@pytest.mark.parametrize("shape", [(3, 5, 2, 4), (2, 4, 11, 7), (1, 1, 1, 1)])  # B, T, I, H; I = 11 > 8: GEMM input
def test_gradcheck(impl, nonlinearity, shape):
    b, t, i, h = shape
    x = torch.randn(b, t, i, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    params = weights(0, h, i, seed=2)
    assert torch.autograd.gradcheck(lambda *a: fused.rnn_layer(*a, nonlinearity=nonlinearity, impl=impl),
                                    (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("last_only", [False, True])
def test_gradcheck_stacked_with_dead_units(impl, last_only):
    # Dead units (bias -5) make the C++ weight gradient run on gathered nonzero units; last_only hands the
    # C++ backward the last state's gradient [N, B, H] alone.
    x = torch.rand(2, 3, 6, 2, dtype=torch.float64).requires_grad_()
    params = weights(2, 9, 2, seed=3, dead=6)
    assert torch.autograd.gradcheck(lambda *a: fused.rnn_layer(*a, impl=impl, last_only=last_only), (x, *params),
                                    eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("nonlinearity", ["relu", "tanh"])
def test_gradcheck_last_only_single_model(impl, nonlinearity):
    x = torch.randn(3, 7, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).requires_grad_()
    params = weights(0, 5, 2, seed=6)
    f = lambda *a: fused.rnn_layer(*a, nonlinearity=nonlinearity, impl=impl, last_only=True)  # noqa: E731
    assert f(x, *params).shape == (3, 5)
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_backward_op_checks_the_gradient_shape():
    if NO_EXTENSION or not fused.available():
        pytest.skip("the C++ extension is not in use")
    x = torch.rand(2, 4, 3)
    params = [p.detach() for p in weights(0, 5, 3, dtype=torch.float32, seed=1)]
    out = fused._EXT.ops.forward(x, *params, True, 1, 0)
    for bad in (torch.zeros(2, 3, 5), torch.zeros(4, 5), torch.zeros(2, 4, 4), torch.zeros(2, 4)):
        with pytest.raises(RuntimeError, match="grad_out must be"):
            fused._EXT.ops.backward(bad, x, params[0], params[1], out, True, True, True, 1, 0)
    with pytest.raises(ValueError, match="at least one time step"):
        fused.rnn_layer(torch.rand(2, 0, 3), *params, last_only=True)


# ------------------------------------------------------------------------------------------------
def _compare_with_nn_rnn(impl, batch, seq_len, inputs, hidden, layers, nonlinearity, irnn_init, seed):
    torch.manual_seed(seed)
    rnn = nn.RNN(inputs, hidden, layers, nonlinearity=nonlinearity, batch_first=True).double()
    if irnn_init:  # identity recurrence, small inputs, some dead units: sparse ReLU states
        with torch.no_grad():
            for layer in range(layers):
                getattr(rnn, f"weight_hh_l{layer}").copy_(torch.eye(hidden))
                getattr(rnn, f"weight_ih_l{layer}").normal_(0, 0.1)
                getattr(rnn, f"bias_hh_l{layer}")[: hidden // 2] = -1.0
    x = torch.rand(batch, seq_len, inputs, dtype=torch.float64, requires_grad=True)
    tensors = [x, *rnn.parameters()]
    ref, _ = rnn(x)
    out = fused.rnn_forward(rnn, x, impl=impl)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    last = fused.rnn_forward(rnn, x, impl=impl, last_only=True)  # what the models' readout uses
    torch.testing.assert_close(last, ref[:, -1], rtol=1e-10, atol=1e-10)
    g_last = torch.randn_like(last)
    cases = [(ref, out, torch.randn_like(ref)),
             (ref, out, torch.zeros_like(ref).index_fill_(1, torch.tensor([seq_len - 1]), 1.0)),
             (ref[:, -1], last, g_last)]
    for ref_out, got_out, g in cases:
        expected = grads_of(ref_out, tensors, g)
        got = grads_of(got_out, tensors, g)
        scale = max(float(e.abs().max()) for e in expected) + 1e-30
        for name, e, o in zip(["x"] + [n for n, _ in rnn.named_parameters()], expected, got):
            torch.testing.assert_close(o, e, rtol=1e-9, atol=1e-11 * scale, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.integers(1, 9), seq_len=st.integers(1, 300), inputs=st.integers(1, 12), hidden=st.integers(1, 40),
       layers=st.integers(1, 3), nonlinearity=st.sampled_from(["relu", "tanh"]), irnn_init=st.booleans(),
       seed=st.integers(0, 2**16))
def test_matches_nn_rnn(impl, batch, seq_len, inputs, hidden, layers, nonlinearity, irnn_init, seed):
    _compare_with_nn_rnn(impl, batch, seq_len, inputs, hidden, layers, nonlinearity, irnn_init, seed)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("irnn_init", [False, True])
def test_matches_nn_rnn_benchmark_shape(impl, irnn_init):
    _compare_with_nn_rnn(impl, 16, 150, 2, 100, 1, "relu", irnn_init, seed=5)


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n_models", [3, 10])  # 10 > the C++'s per-model compaction limit: one bmm
def test_stacked_equals_separate(impl, n_models):
    x = torch.rand(n_models, 4, 13, 3, dtype=torch.float64, requires_grad=True)
    params = weights(n_models, 17, 3, seed=4, dead=8)
    out = fused.rnn_layer(x, *params, impl=impl)
    g = torch.randn_like(out)
    stacked_grads = grads_of(out, [x, *params], g)
    for n in range(n_models):
        xn = x[n].detach().requires_grad_()
        pn = [p[n].detach().requires_grad_() for p in params]
        out_n = fused.rnn_layer(xn, *pn, impl=impl)
        torch.testing.assert_close(out[n], out_n, rtol=1e-13, atol=1e-13)
        for sg, gn in zip(stacked_grads, grads_of(out_n, [xn, *pn], g[n])):
            torch.testing.assert_close(sg[n], gn, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("last_only", [False, True])
def test_stacked_data_inputs_equal_separate(impl, threads, last_only):
    # Inputs without gradient (data, as in training) and more models than threads: the C++ runs each
    # model's whole backward in turn (backward_by_model); it must equal training each model alone.
    n_models, before = 5, torch.get_num_threads()
    x = torch.rand(n_models, 3, 9, 2, dtype=torch.float64)
    params = weights(n_models, 12, 2, seed=7, dead=5)
    torch.set_num_threads(threads)
    try:
        out = fused.rnn_layer(x, *params, impl=impl, last_only=last_only)
        g = torch.randn_like(out)
        stacked_grads = grads_of(out, params, g)
        for n in range(n_models):
            pn = [p[n].detach().requires_grad_() for p in params]
            out_n = fused.rnn_layer(x[n], *pn, impl=impl, last_only=last_only)
            torch.testing.assert_close(out[n], out_n, rtol=1e-13, atol=1e-13)
            for sg, gn in zip(stacked_grads, grads_of(out_n, pn, g[n])):
                torch.testing.assert_close(sg[n], gn, rtol=1e-12, atol=1e-12)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_grad_forward(impl):
    x = torch.rand(5, 20, 2)
    params = weights(0, 30, 2, dtype=torch.float32)
    with_grad = fused.rnn_layer(x, *params, impl=impl)
    with torch.no_grad():
        out = fused.rnn_layer(x, *params, impl=impl)
    assert out.grad_fn is None and not out.requires_grad
    assert out.dtype == torch.float32 and out.shape == (5, 20, 30)
    torch.testing.assert_close(out, with_grad.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dead", [0, 60])
def test_deterministic(impl, dead):
    x = torch.rand(16, 150, 2)
    params = weights(0, 100, 2, dtype=torch.float32, dead=dead)

    def run():
        out = fused.rnn_layer(x, *params, impl=impl)
        return [out.detach(), *torch.autograd.grad(out[:, -1].sum(), params)]

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_groups_follow_the_shapes_not_the_threads():
    x = torch.rand(32, 150, 2)
    w_hh = torch.rand(100, 100)
    counts = set()
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        counts.add(fused._groups(x, w_hh))
    assert counts == {2}
    assert fused._groups(torch.rand(8, 150, 2), w_hh) == 1  # at least 8 rows a group
    assert fused._groups(torch.rand(5, 6, 4, 2), torch.rand(5, 3, 3)) == 1  # too little work to split


# Thread counts to compare: 1 against 2 and 3 (3 > the cores of a 2-core machine, and an odd split).
@pytest.mark.parametrize("case", [
    dict(batch=32, seq=40, hidden=100, inputs=2),                      # 2 row groups, in-loop dW_hh
    dict(batch=16, seq=30, hidden=64, inputs=2, nonlinearity="tanh"),
    dict(batch=24, seq=20, hidden=5, inputs=2),                        # H < HP - H: reads into out's padding
    dict(batch=16, seq=20, hidden=40, inputs=12, need_x=True),         # wide inputs: GEMMs over batch x time
    dict(batch=16, seq=30, hidden=48, inputs=2, gemm_dw=True),         # dW_hh as GEMMs after the loop
    dict(batch=16, seq=30, hidden=48, inputs=2, models=3),             # a stack: backward_by_model
    dict(batch=16, seq=30, hidden=48, inputs=12, models=3, need_x=True),
    dict(batch=16, seq=30, hidden=48, inputs=2, models=3, gemm_dw=True),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_results_do_not_depend_on_the_thread_count(case, dtype, monkeypatch):
    # Bitwise: every sum over batch rows runs in an order fixed by the shapes (row groups, their partials
    # added in order, single-threaded BLAS), so a run gives the same numbers on 1, 2 or 3 threads.
    if NO_EXTENSION:
        pytest.skip("IRNN_NO_EXTENSION is set")
    case = dict(case)
    models, need_x = case.pop("models", 0), case.pop("need_x", False)
    monkeypatch.setenv("IRNN_FUSED_DW", "gemm" if case.pop("gemm_dw", False) else "auto")
    nonlinearity = case.pop("nonlinearity", "relu")
    lead = (models,) if models else ()
    g = torch.Generator().manual_seed(3)
    x = torch.rand(*lead, case["batch"], case["seq"], case["inputs"], generator=g, dtype=dtype) * 2 - 1
    x.requires_grad_(need_x)
    params = weights(models, case["hidden"], case["inputs"], dtype=dtype, seed=5, dead=case["hidden"] // 4)
    gout = torch.randn(*lead, case["batch"], case["seq"], case["hidden"], generator=g, dtype=dtype)

    def run(threads):
        torch.set_num_threads(threads)
        out = fused.rnn_layer(x, *params, nonlinearity=nonlinearity, impl="cpp")
        wrt = [x, *params] if need_x else params
        return [out.detach(), *torch.autograd.grad(out, wrt, gout)]

    one = run(1)
    assert all(bool(t.abs().sum() > 0) for t in one)  # nothing trivially zero
    for threads in (2, 3):
        for a, b in zip(one, run(threads)):
            assert torch.equal(a, b), f"{threads} threads differ from 1 by {float((a - b).abs().max())}"


def test_stacked_member_equals_the_model_alone_bitwise():
    # What an ensemble member must get: a stack of 3 and each model alone, float32, on 1 and 2 threads.
    if NO_EXTENSION:
        pytest.skip("IRNN_NO_EXTENSION is set")
    n_models = 3
    x = torch.rand(n_models, 32, 40, 2, generator=torch.Generator().manual_seed(1))
    params = weights(n_models, 64, 2, dtype=torch.float32, seed=2, dead=16)
    gout = torch.randn(n_models, 32, 64, generator=torch.Generator().manual_seed(2))
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out = fused.rnn_layer(x, *params, impl="cpp", last_only=True)
        stacked_grads = torch.autograd.grad(out, params, gout)
        for n in range(n_models):
            pn = [p[n].detach().requires_grad_() for p in params]
            out_n = fused.rnn_layer(x[n], *pn, impl="cpp", last_only=True)
            assert torch.equal(out[n], out_n)
            for sg, gn in zip(stacked_grads, torch.autograd.grad(out_n, pn, gout[n])):
                assert torch.equal(sg[n], gn)


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_every_instruction_set_agrees(isa, monkeypatch):
    if NO_EXTENSION:
        pytest.skip("IRNN_NO_EXTENSION is set")
    if fused.ISA[isa] > fused._EXT.ops.best_isa():
        pytest.skip(f"this CPU has no {isa}")
    monkeypatch.setenv("IRNN_FUSED_ISA", isa)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
        x = torch.rand(7, 40, 3, dtype=dtype, requires_grad=True)
        params = weights(0, 37, 3, dtype=dtype, dead=10)
        out = fused.rnn_layer(x, *params, impl="cpp")
        ref = fused.rnn_layer(x, *params, impl="python")
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
        g = torch.randn_like(out)
        for a, b in zip(grads_of(out, [x, *params], g), grads_of(ref, [x, *params], g)):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * float(b.abs().max()))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n_models", [0, 3])
@pytest.mark.parametrize("hidden", [8, 33, 100])  # 8: float32 pads it to 16 (AVX-512), the widest read past a row
@pytest.mark.parametrize("isa", ["auto", "avx2", "generic"])
def test_in_loop_recurrent_weight_grad_equals_the_gemm(threads, n_models, hidden, isa, monkeypatch):
    # dW_hh summed inside the backward time loop (the default) against one GEMM over all steps after it
    # (IRNN_FUSED_DW=gemm), with dead units, relu and tanh, single and stacked models, rows split over
    # threads or not, on every instruction set (each pads rows to its own vector width).
    if NO_EXTENSION:
        pytest.skip("IRNN_NO_EXTENSION is set")
    if isa != "auto" and fused.ISA[isa] > fused._EXT.ops.best_isa():
        pytest.skip(f"this CPU has no {isa}")
    monkeypatch.setenv("IRNN_FUSED_ISA", isa)
    torch.set_num_threads(threads)
    lead = (n_models,) if n_models else ()
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        for nonlinearity in ("relu", "tanh"):
            x = torch.rand(*lead, 12, 50, 2, dtype=dtype)
            params = weights(n_models, hidden, 2, dtype=dtype, dead=hidden // 3)
            g = torch.randn(*lead, 12, hidden, dtype=dtype)

            def grads(mode):
                monkeypatch.setenv("IRNN_FUSED_DW", mode)
                out = fused.rnn_layer(x, *params, nonlinearity=nonlinearity, impl="cpp", last_only=True)
                return torch.autograd.grad(out, params, g)

            (a, b) = grads("auto"), grads("gemm")
            for u, v in zip(a, b):
                torch.testing.assert_close(u, v, rtol=tol, atol=tol * float(v.abs().max()))
            if dtype == torch.float32 and hidden == 100:  # both paths ran: their sums round differently
                assert not torch.equal(a[1], b[1])
    monkeypatch.setenv("IRNN_FUSED_DW", "sideways")
    with pytest.raises(ValueError, match="IRNN_FUSED_DW"):
        torch.autograd.grad(fused.rnn_layer(x, *params, impl="cpp").sum(), params)


@pytest.mark.parametrize("impl", IMPLS)
def test_relu_gradient_at_exactly_zero_preactivation(impl):
    # x = 0, W_hh = I and b_ih = 0 for the first half of the units: their z is exactly 0 at every step.
    # nn.RNN (threshold_backward) passes no gradient through relu at 0; so must we.
    hidden = 6
    rnn = nn.RNN(1, hidden, nonlinearity="relu", batch_first=True).double()
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(torch.eye(hidden))
        rnn.bias_hh_l0.zero_()
        rnn.bias_ih_l0.copy_(torch.tensor([0.0] * (hidden // 2) + [0.5] * (hidden - hidden // 2)))
    x = torch.zeros(3, 8, 1, dtype=torch.float64, requires_grad=True)
    ref, _ = rnn(x)
    out = fused.rnn_forward(rnn, x, impl=impl)
    assert (out[..., : hidden // 2] == 0).all()
    tensors = [x, *rnn.parameters()]
    for e, o in zip(grads_of(ref.sum(), tensors, None), grads_of(out.sum(), tensors, None)):
        torch.testing.assert_close(o, e, rtol=1e-14, atol=0)


def test_gradients_land_in_the_module():
    model_a = nn.RNN(2, 12, 2, batch_first=True)
    model_b = nn.RNN(2, 12, 2, batch_first=True)
    model_b.load_state_dict(model_a.state_dict())
    x = torch.rand(4, 25, 2)
    model_a(x)[0][:, -1].pow(2).sum().backward()
    fused.rnn_forward(model_b, x)[:, -1].pow(2).sum().backward()
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert list(model_b.state_dict()) == list(model_a.state_dict())


def test_time_major_module_and_noncontiguous_input():
    rnn = nn.RNN(3, 8, batch_first=False).double()
    x = torch.rand(5, 11, 3, dtype=torch.float64).transpose(0, 1)  # [T=11, B=5, I], a strided view
    torch.testing.assert_close(fused.rnn_forward(rnn, x), rnn(x)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind", ["relu", "tanh", "lstm", "gru"])
def test_unbatched_input_as_the_module_takes_it(kind, batch_first, impl):
    """x of shape [T, I], which nn.RNN/LSTM/GRU accept unbatched whatever batch_first says, runs like the
    module: outputs [T, H], the last state [H], and the module's own gradients (two layers, float64)."""
    from irnn.engine import fused_gates
    torch.manual_seed(3)
    if kind in ("relu", "tanh"):
        rnn, forward = nn.RNN(3, 5, 2, nonlinearity=kind, batch_first=batch_first), fused.rnn_forward
    else:
        rnn, forward = (nn.LSTM if kind == "lstm" else nn.GRU)(3, 5, 2, batch_first=batch_first), fused_gates.gates_forward
    rnn = rnn.double()
    x = torch.randn(9, 3, dtype=torch.float64)
    out = forward(rnn, x, impl=impl)
    ref = rnn(x)[0]
    assert out.shape == ref.shape == (9, 5)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    mine = torch.autograd.grad(out, list(rnn.parameters()), g)
    want = torch.autograd.grad(ref, list(rnn.parameters()), g)
    for a, b in zip(mine, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    last = forward(rnn, x, impl=impl, last_only=True)
    assert last.shape == (5,)
    assert torch.equal(last.detach(), out[-1].detach())
    for bad in (torch.randn(3), torch.randn(1, 2, 9, 3)):
        with pytest.raises(ValueError, match=r"unbatched \[T, I\], got shape"):
            forward(rnn, bad.double(), impl=impl)


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda: nn.RNN(2, 4, bidirectional=True, batch_first=True),
    lambda: nn.RNN(2, 4, num_layers=2, dropout=0.5, batch_first=True),
    lambda: nn.RNN(2, 4, bias=False, batch_first=True),
    lambda: nn.LSTM(2, 4, batch_first=True),
    lambda: nn.GRU(2, 4, batch_first=True),
])
def test_unsupported_modules(make):
    module = make()
    assert not fused.supports(module)
    with pytest.raises(ValueError):
        fused.rnn_forward(module, torch.rand(2, 3, 2))


def test_supported_module():
    assert fused.supports(nn.RNN(2, 4, num_layers=3, nonlinearity="relu", batch_first=True))


def test_bad_arguments():
    x = torch.rand(2, 3, 4)
    params = weights(0, 5, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        fused.rnn_layer(x.double(), *params)
    with pytest.raises(ValueError, match="CPU"):
        fused.rnn_layer(x.to("meta"), *[p.detach().to("meta") for p in params])
    with pytest.raises(ValueError, match="w_ih"):
        fused.rnn_layer(torch.rand(2, 3, 5), *params)
    with pytest.raises(ValueError, match="nonlinearity"):
        fused.rnn_layer(x, *params, nonlinearity="gelu")
    with pytest.raises(ValueError, match="impl"):
        fused.rnn_layer(x, *params, impl="cuda")


@pytest.mark.skipif(NO_EXTENSION, reason="needs the C++ extension")
def test_tanh_without_aten_dispatch_is_bitwise_torch_tanh(tmp_path):
    """The forward's tanh (MKL's vmsTanh on all of a step's rows in one call, where torch has it) gives
    bitwise the states of the ATen tanh_ call it replaces, for row widths with and without a vector tail,
    narrow and wide inputs, and every instruction set; so does the backward that reads them."""
    code = textwrap.dedent("""
        import sys, torch
        from irnn.engine import fused
        assert fused.available()
        ops = fused._load()
        torch.manual_seed(0)
        outs = []
        for B, T, H, I in [(16, 150, 100, 2), (5, 37, 19, 3), (32, 20, 100, 12), (3, 9, 129, 1), (16, 50, 7, 2)]:
            x = torch.randn(B, T, I) * 2
            w_ih, w_hh = torch.randn(H, I), torch.randn(H, H) / H ** 0.5
            b_ih, b_hh = torch.randn(H) * 0.1, torch.randn(H) * 0.1
            for isa in (0, 2, 1):
                out = ops.forward(x, w_ih, w_hh, b_ih, b_hh, False, 2, isa)
                grads = ops.backward(torch.randn(B, T, H), x, w_ih, w_hh, out, False, True, True, 2, isa, False)
                outs += [out, *grads]
        torch.save(outs, sys.argv[1])
    """)
    path = os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])
    results = {}
    for mode in ("aten", "default"):
        env = dict(os.environ, PYTHONPATH=path, IRNN_FUSED_TANH=mode)
        out = tmp_path / f"{mode}.pt"
        result = subprocess.run([sys.executable, "-c", code, str(out)], env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr
        results[mode] = torch.load(out)
    assert len(results["aten"]) == len(results["default"]) == 5 * 3 * 5
    for a, b in zip(results["aten"], results["default"]):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
def test_no_extension_env_falls_back():
    code = textwrap.dedent("""
        import warnings, torch
        warnings.simplefilter("error")  # the forced fallback is silent: no build attempted, no warning
        from irnn.engine import fused
        assert not fused.available()
        x = torch.rand(2, 5, 2, dtype=torch.float64)
        params = [torch.rand(3, 2).double(), torch.rand(3, 3).double(), torch.rand(3).double(), torch.rand(3).double()]
        out = fused.rnn_layer(x, *params)
        torch.testing.assert_close(out, fused.rnn_layer(x, *params, impl="python"), rtol=0, atol=0)
        try:
            fused.rnn_layer(x, *params, impl="cpp")
        except RuntimeError:
            print("ok")
    """)
    path = os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, IRNN_NO_EXTENSION="1", PYTHONPATH=path)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_failed_build_warns_once_and_falls_back(monkeypatch):
    import torch.utils.cpp_extension as cpp_extension

    def broken_load(*args, **kwargs):
        raise RuntimeError("Error building extension 'irnn_fused_rnn'\nfused_rnn.cpp:1:1: error: no compiler")

    monkeypatch.setattr(fused._EXT, "ops", None)
    monkeypatch.setattr(fused._EXT, "failed", False)
    monkeypatch.setattr(cpp_extension, "load", broken_load)
    monkeypatch.delenv("IRNN_NO_EXTENSION", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not fused.available()
        assert not fused.available()
        x = torch.rand(2, 4, 3)
        out = fused.rnn_layer(x, *weights(0, 5, 3, dtype=torch.float32))
    assert out.shape == (2, 4, 5)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "no compiler" in messages[0] and "\n" not in messages[0]


def test_each_source_builds_into_its_own_folder(tmp_path):
    """Two checkouts at different versions share torch's extension folder: a build named only by the torch
    version would be rebuilt by each over the other, and one would load the other's code."""
    from irnn.engine.build import extension_name

    a, b = tmp_path / "a.cpp", tmp_path / "b.cpp"
    a.write_text("int f() { return 1; }\n")
    b.write_text("int f() { return 2; }\n")
    assert extension_name("irnn_x", a) != extension_name("irnn_x", b)
    assert extension_name("irnn_x", a) == extension_name("irnn_x", a)
    assert extension_name("irnn_x", a) != extension_name("irnn_x", a, ["-O2"])
    assert extension_name("irnn_x", a).startswith("irnn_x_")


def test_two_checkouts_of_one_source_compile_the_same_path(tmp_path, monkeypatch):
    """torch rebuilds when a source's absolute path changes, so each checkout compiles one staged copy, named
    by the extension (source digest), written once: its bytes are the source's and its mtime stays put."""
    from irnn.engine.build import extension_name, staged_source

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    one, two = tmp_path / "one" / "k.cpp", tmp_path / "two" / "k.cpp"
    for p in (one, two):
        p.parent.mkdir()
        p.write_text("int f() { return 1; }\n")
    name = extension_name("irnn_x", one)
    assert name == extension_name("irnn_x", two)
    staged = staged_source(name, one)
    assert staged.read_bytes() == one.read_bytes() and staged.is_relative_to(tmp_path / "ext")
    stamp = staged.stat().st_mtime_ns
    assert staged_source(name, two) == staged and staged.stat().st_mtime_ns == stamp
    other = tmp_path / "three" / "k.cpp"
    other.parent.mkdir()
    other.write_text("int f() { return 2; }\n")
    assert staged_source(extension_name("irnn_x", other), other) != staged
