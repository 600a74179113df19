"""The IRNN's successors: each initialised as its paper defines it, constrained as its paper does, and run
by the fast engines where the maths allows, with the engines' numbers equal to the PyTorch reference."""
from __future__ import annotations

import math

import pytest
import torch

from irnn.config import from_dict
from irnn.engine import cell_of, make_forward, resolve_engine
from irnn.models import build_model
from irnn.models.indrnn import IndRNN, reference_recurrence

CPU = torch.device("cpu")


def _model(name, input_size=3, output_size=2, per_step=False, **cfg):
    torch.manual_seed(cfg.pop("seed", 0))
    c = from_dict(dict(model=name, hidden_size=cfg.pop("hidden_size", 24), seq_len=cfg.pop("seq_len", 50), **cfg))
    return build_model(c, input_size, output_size, per_step=per_step)


def test_np_rnn_is_a_normalised_positive_definite_matrix():
    w = _model("np-rnn", hidden_size=40).rnn.weight_hh_l0.detach().double()
    eig = torch.linalg.eigvalsh(w)
    assert torch.allclose(w, w.T, atol=1e-6)  # symmetric
    assert eig.max().item() == pytest.approx(1.0, abs=1e-5) and eig.min().item() > 0  # PD, top eigenvalue 1
    assert _model("np-rnn").nonlinearity == "relu"


@pytest.mark.parametrize("nonlinearity", ["relu", "tanh"])
def test_rnn_orth_starts_orthogonal(nonlinearity):
    m = _model("rnn-orth", hidden_size=30, orth_nonlinearity=nonlinearity, num_layers=2)
    for layer in range(2):
        w = getattr(m.rnn, f"weight_hh_l{layer}").detach().double()
        assert torch.allclose(w.T @ w, torch.eye(30, dtype=torch.float64), atol=1e-5)
    assert m.nonlinearity == nonlinearity and cell_of(m) == nonlinearity


@pytest.mark.parametrize("t_max, seq_len", [(0, 80), (500, 80)])
def test_chrono_lstm_biases(t_max, seq_len):
    m = _model("chrono-lstm", hidden_size=64, chrono_tmax=t_max, seq_len=seq_len)
    expect_max = (t_max or seq_len) - 1.0
    h = 64
    b_ih, b_hh = m.rnn.bias_ih_l0.detach(), m.rnn.bias_hh_l0.detach()
    forget, inp = b_ih[h:2 * h], b_ih[:h]
    assert forget.min() >= 0 and forget.max() <= math.log(expect_max) + 1e-6
    assert forget.max() > math.log(expect_max) - 1.0  # spread over log U[1, T_max - 1], not one value
    assert torch.equal(inp, -forget)  # input bias = -forget bias
    assert not b_ih[2 * h:].any() and not b_hh.any()
    assert cell_of(m) == "lstm" and resolve_engine("auto", m, CPU) in ("fused", "torch")


def test_indrnn_init_and_the_bound_after_every_step(tmp_path):
    m = _model("indrnn", seq_len=100, indrnn_gamma=2.0, num_layers=2)
    bound = 2.0 ** (1 / 100)
    assert m.bound == pytest.approx(bound)
    for u in m.u:
        assert u.min() >= 0 and u.max() <= bound
    from irnn import train

    run = train(from_dict(dict(model="indrnn", seq_len=20, hidden_size=8, num_layers=2, lr=5.0, steps=2, input_std=1.0,
                               eval_every=2, log_every=2, train_size=32, test_size=16, batch_size=8, quiet=True,
                               guard=False, out=str(tmp_path), name="ind")))
    assert run.summary["status"] == "completed"
    from irnn.runs.checkpoint import load

    start, end = (load(tmp_path / "ind" / "checkpoints" / f"ckpt-00000000{s}.pt")["model"] for s in (0, 2))
    us = [(start[k], v) for k, v in end.items() if k.startswith("u.")]
    # Adam at lr 5 moves every u that has a gradient by about 5 a step: each one ends clipped at the bound
    # (a unit that never fired has no gradient and stays where it started)
    b = 2.0 ** (1 / 20)
    moved = torch.cat([u1 != u0 for u0, u1 in us])
    ends = torch.cat([u1 for _, u1 in us])
    assert len(us) == 2 and moved.sum() >= 4
    torch.testing.assert_close(ends[moved].abs(), torch.full_like(ends[moved], b))
    assert ends.abs().max() <= b + 1e-7


@pytest.mark.parametrize("dtype", [torch.float64])
def test_indrnn_fused_loop_gradcheck(dtype):
    from irnn.engine import indrnn

    if not indrnn.available():
        pytest.skip("the C++ engine did not build here")
    pre = torch.randn(3, 7, 5, dtype=dtype, requires_grad=True)
    u = torch.rand(5, dtype=dtype).mul(1.1).requires_grad_()
    assert torch.autograd.gradcheck(indrnn.recurrence, (pre, u))


@pytest.mark.parametrize("per_step", [False, True])
def test_indrnn_fused_loop_equals_the_reference(per_step):
    from irnn.engine import indrnn

    m = _model("indrnn", seq_len=37, num_layers=2, per_step=per_step)
    x = torch.randn(6, 37, 3)
    assert resolve_engine("auto", m, CPU) == ("fused" if indrnn.available() else "torch")
    ref = m(x)
    ref.square().sum().backward()
    g_ref = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    out = make_forward(m, "fused")(x)
    out.square().sum().backward()
    assert out.shape == ((6, 37, 2) if per_step else (6, 2))
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    for g, r in zip([p.grad for p in m.parameters()], g_ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_indrnn_reference_is_the_papers_equation():
    pre, u = torch.randn(2, 4, 3), torch.rand(3)
    h = torch.zeros(2, 3)
    for t in range(4):
        h = torch.relu(pre[:, t] + u * h)
    assert torch.equal(reference_recurrence(pre, u)[:, -1], h)
    assert isinstance(_model("indrnn"), IndRNN)


def test_exprnn_stays_orthogonal_through_training():
    from irnn.models.exprnn import henaff_matrix

    m = _model("exprnn", hidden_size=16)
    q = m.recurrent[0].weight.detach().double()
    eye = torch.eye(16, dtype=torch.float64)
    assert torch.allclose(q.T @ q, eye, atol=1e-5) and torch.linalg.det(q).item() == pytest.approx(1.0, abs=1e-4)
    # Henaff init: eigenvalues exp(+-i s) in conjugate pairs, one rotation per 2 x 2 block
    h = henaff_matrix(16).double()
    assert torch.allclose(h[:2, 2:], torch.zeros(2, 14, dtype=torch.float64))
    assert h[0, 0].item() == pytest.approx(h[1, 1].item()) and h[0, 1].item() == pytest.approx(-h[1, 0].item())
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    x, y = torch.randn(8, 12, 3), torch.randn(8, 2)
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.mse_loss(m(x), y).backward()
        opt.step()
    q2 = m.recurrent[0].weight.detach().double()
    assert not torch.allclose(q2, q, atol=1e-3)  # it moved...
    assert torch.allclose(q2.T @ q2, eye, atol=1e-5)  # ...and stayed on the orthogonal group
    assert cell_of(m) is None and resolve_engine("auto", m, CPU) == "torch"


@pytest.mark.parametrize("name", ["irnn", "rnn-tanh", "np-rnn", "lstm", "gru", "chrono-lstm"])
def test_per_step_readout_is_the_same_on_the_fused_and_torch_engines(name):
    m = _model(name, per_step=True, input_size=10, output_size=9, hidden_size=20)
    if resolve_engine("auto", m, CPU) != "fused":
        pytest.skip("the C++ engine did not build here")
    x = torch.randn(5, 33, 10)
    ref = m(x)
    ref.logsumexp(-1).sum().backward()
    g_ref = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    out = make_forward(m, "fused")(x)
    out.logsumexp(-1).sum().backward()
    assert out.shape == (5, 33, 9)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip([p.grad for p in m.parameters()], g_ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_indrnn_fused_loop_is_bitwise_the_same_for_any_thread_count():
    from irnn.engine import indrnn

    if not indrnn.available():
        pytest.skip("the C++ engine did not build here")
    g = torch.Generator().manual_seed(7)
    pre = torch.randn(9, 40, 33, generator=g).requires_grad_()
    u = torch.rand(33, generator=g).requires_grad_()
    grad = torch.randn(9, 40, 33, generator=g)
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out = indrnn.recurrence(pre, u)
            dpre, du = torch.autograd.grad(out, (pre, u), grad)
            results.append((out, dpre, du))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
