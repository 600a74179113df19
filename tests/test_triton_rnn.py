"""The fused Triton RNN layer against a float64 reference: under Triton's interpreter on CPU, compiled on a GPU.

The CPU tests request the ``interpret`` fixture, which sets TRITON_INTERPRET=1 for that test only
(the engine reads it at call time, so other tests in the session are unaffected).
"""
import pytest
import torch
from hypothesis import given, settings, strategies as st

triton = pytest.importorskip("triton")

from irnn.engine import triton_rnn as tr  # noqa: E402
from irnn.models import RecurrentModel  # noqa: E402

tl = triton.language
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _probe_kernel(x_ptr, n):
    acc = tl.load(x_ptr)
    for _ in range(n):
        acc += 1.0
    tl.store(x_ptr, acc)


def _interpreter_problem():
    """None if Triton's interpreter runs a loop over a run-time bound here, else why not."""
    from triton.runtime.interpreter import InterpretedFunction

    x = torch.zeros(1)
    try:
        InterpretedFunction(_probe_kernel)[(1,)](x, 3)
    except Exception as e:  # noqa: BLE001 - e.g. triton 3.6's interpreter with numpy >= 2.4
        return f"{type(e).__name__}: {e}"
    return None if x.item() == 3.0 else f"probe kernel computed {x.item()}, not 3"


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    problem = _interpreter_problem()
    if problem:
        pytest.skip(f"Triton's interpreter does not run here (triton {triton.__version__}): {problem}")


def reference(x, w_ih, w_hh, b_ih, b_hh, nonlinearity):
    """h_t = f(x_t W_ih^T + b_ih + b_hh + h_{t-1} W_hh^T), h_{-1} = 0, in a plain loop. x [N, B, T, I]."""
    N, B, T, _ = x.shape
    f = torch.relu if nonlinearity == "relu" else torch.tanh
    h = x.new_zeros(N, B, w_hh.shape[-1])
    out = []
    for t in range(T):
        z = x[:, :, t] @ w_ih.transpose(1, 2) + h @ w_hh.transpose(1, 2)
        if b_ih is not None:
            z = z + b_ih[:, None] + b_hh[:, None]
        h = f(z)
        out.append(h)
    return torch.stack(out, 2)  # [N, B, T, H]


def random_layer(N, B, T, I, H, seed=0, bias=True, device="cpu", noise=0.3):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(N, B, T, I, generator=g)
    w_ih = torch.randn(N, H, I, generator=g) * 0.5
    # Near the identity, as an IRNN is, with enough noise that ReLU units switch off and on
    # (long sequences need less, or the state grows like (1 + noise)^T).
    w_hh = torch.eye(H) + noise * torch.randn(N, H, H, generator=g) / H ** 0.5
    b_ih = torch.randn(N, H, generator=g) * 0.1 if bias else None
    b_hh = torch.randn(N, H, generator=g) * 0.1 if bias else None
    return [None if t is None else t.to(device).requires_grad_() for t in (x, w_ih, w_hh, b_ih, b_hh)]


def rel(a, b):
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-300)).item()


def check_against_float64(params, nonlinearity="relu", tol=1e-5, **kw):
    """Forward and every gradient (x, W_ih, W_hh, b_ih, b_hh) of the Triton layer vs float64; returns the errors."""
    live = [p for p in params if p is not None]
    out = tr.rnn_layer_triton(*params, nonlinearity=nonlinearity, **kw)
    g_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    grads = torch.autograd.grad(out, live, g_out)
    p64 = [None if p is None else p.detach().double().requires_grad_() for p in params]
    out64 = reference(*p64, nonlinearity)
    grads64 = torch.autograd.grad(out64, [p for p in p64 if p is not None], g_out.double())
    assert out.shape == out64.shape
    errors = [rel(out, out64)] + [rel(g, g64) for g, g64 in zip(grads, grads64)]
    assert max(errors) < tol, errors
    return errors


# --- CPU, interpreter ----------------------------------------------------------------------------

@pytest.mark.parametrize("nonlinearity", tr.NONLINEARITIES)
@pytest.mark.parametrize("precision", tr.PRECISIONS)
@pytest.mark.parametrize("transposed", [True, False])
def test_stacked_layer_matches_float64(interpret, nonlinearity, precision, transposed):
    check_against_float64(random_layer(2, 3, 5, 2, 7), nonlinearity, precision=precision, transposed=transposed)


def test_hidden_100_is_padded_to_128(interpret):
    check_against_float64(random_layer(1, 16, 6, 2, 100, seed=3))


def test_batch_above_16_and_no_bias(interpret):
    check_against_float64(random_layer(2, 17, 4, 3, 20, seed=4, bias=False), "tanh")


def test_single_step(interpret):
    check_against_float64(random_layer(3, 2, 1, 1, 5, seed=5))


@settings(max_examples=8, deadline=None)
@given(N=st.integers(1, 3), B=st.integers(1, 20), T=st.integers(1, 7), I=st.integers(1, 4), H=st.integers(1, 40),
       tanh=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_random_shapes_match_float64(N, B, T, I, H, tanh, seed):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        if _interpreter_problem():
            pytest.skip("Triton's interpreter does not run here")
        check_against_float64(random_layer(N, B, T, I, H, seed=seed), "tanh" if tanh else "relu")


def test_unstacked_input_is_one_model(interpret):
    x, w_ih, w_hh, b_ih, b_hh = [t.detach() for t in random_layer(1, 3, 5, 2, 7)]
    one = tr.rnn_layer_triton(x[0], w_ih[0], w_hh[0], b_ih[0], b_hh[0])
    stacked = tr.rnn_layer_triton(x, w_ih, w_hh, b_ih, b_hh)
    assert one.shape == (3, 5, 7)
    torch.testing.assert_close(one, stacked[0], rtol=0, atol=0)


@pytest.mark.parametrize("kind,layers", [("irnn", 2), ("rnn-tanh", 1)])
def test_model_forward_matches_the_model(interpret, kind, layers):
    torch.manual_seed(0)
    model = RecurrentModel(kind, 2, 12, 1, layers, recurrent_std=0.3, input_std=0.5)
    x = torch.rand(4, 6, 2)
    fast = tr.model_forward(model)(x)
    grads = torch.autograd.grad(fast.sum(), list(model.parameters()))
    ref = model(x)
    ref_grads = torch.autograd.grad(ref.sum(), list(model.parameters()))
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_model_forward_refuses_lstm():
    with pytest.raises(ValueError, match="ReLU and tanh"):
        tr.model_forward(RecurrentModel("lstm", 2, 4, 1))


def test_bad_arguments_are_named(interpret):
    x, w_ih, w_hh, b_ih, b_hh = [t.detach() for t in random_layer(1, 2, 3, 2, 4)]
    with pytest.raises(ValueError, match="nonlinearity"):
        tr.rnn_layer_triton(x, w_ih, w_hh, b_ih, b_hh, nonlinearity="gelu")
    with pytest.raises(ValueError, match="precision"):
        tr.rnn_layer_triton(x, w_ih, w_hh, b_ih, b_hh, precision="bf16")
    with pytest.raises(ValueError, match="float32"):
        tr.rnn_layer_triton(x.double(), w_ih.double(), w_hh.double())
    with pytest.raises(ValueError, match="w_ih"):
        tr.rnn_layer_triton(x, w_ih[:, :3], w_hh)
    with pytest.raises(ValueError, match="x must be"):
        tr.rnn_layer_triton(x[0, 0], w_ih[0], w_hh[0])


def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w_ih, w_hh, _, _ = [t.detach() if t is not None else None for t in random_layer(1, 2, 3, 2, 4)]
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        tr.rnn_layer_triton(x, w_ih, w_hh)
    assert tr.available() == torch.cuda.is_available()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tr.available()


# --- GPU, compiled ------------------------------------------------------------------------------

@gpu
@pytest.mark.parametrize("precision,transposed,nonlinearity", [
    ("tf32x3", True, "relu"), ("tf32x3", False, "relu"), ("tf32x3", True, "tanh"), ("ieee", True, "relu")])
def test_gpu_long_sequences_are_fp32_grade(precision, transposed, nonlinearity):
    """T=150, H=100: PERF_NOTES' bar for an fp32-grade path is a gradient error <= 1e-4 against float64."""
    params = random_layer(4, 16, 150, 2, 100, seed=7, device="cuda", noise=0.03)
    check_against_float64(params, nonlinearity, tol=1e-4, precision=precision, transposed=transposed)


@gpu
def test_gpu_plain_tf32_runs():
    """TF32 is the inexact fast mode: it must run and stay finite, not be accurate."""
    params = random_layer(4, 16, 150, 2, 100, seed=7, device="cuda", noise=0.03)
    out = tr.rnn_layer_triton(*params, precision="tf32")
    out.sum().backward()
    assert torch.isfinite(out).all() and all(torch.isfinite(p.grad).all() for p in params)


@gpu
def test_gpu_matches_the_interpreted_shapes():
    check_against_float64(random_layer(2, 3, 5, 2, 7, device="cuda"), tol=1e-5)
    check_against_float64(random_layer(2, 17, 9, 3, 33, seed=2, device="cuda"), "tanh", tol=1e-5)
