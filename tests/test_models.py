"""Models: initialisation and agreement with a hand-written float64 recurrence."""
import pytest
import torch

from irnn.models import MODEL_KINDS, RecurrentModel


@pytest.mark.parametrize("scale", [1.0, 0.01, 0.5])
@pytest.mark.parametrize("layers", [1, 3])
def test_irnn_init_is_scaled_identity_and_zero_bias(scale, layers):
    torch.manual_seed(0)
    m = RecurrentModel("irnn", 2, 37, 1, layers, init_scale=scale, input_std=0.001)
    for l in range(layers):
        assert torch.equal(getattr(m.rnn, f"weight_hh_l{l}"), torch.eye(37) * scale)
        assert torch.all(getattr(m.rnn, f"bias_ih_l{l}") == 0) and torch.all(getattr(m.rnn, f"bias_hh_l{l}") == 0)
    w = m.rnn.weight_ih_l0
    assert w.std().item() == pytest.approx(0.001, rel=0.3) and w.abs().max() < 0.01
    assert m.rnn.nonlinearity == "relu"


def test_gaussian_baselines_and_lstm_forget_bias():
    torch.manual_seed(0)
    m = RecurrentModel("rnn-relu", 2, 200, 1, recurrent_std=0.05)
    assert m.rnn.weight_hh_l0.std().item() == pytest.approx(0.05, rel=0.05)
    assert m.rnn.weight_hh_l0.mean().abs() < 0.01
    assert RecurrentModel("rnn-tanh", 2, 10, 1).rnn.nonlinearity == "tanh"
    lstm = RecurrentModel("lstm", 2, 10, 1, forget_bias=4.0)
    total = lstm.rnn.bias_ih_l0 + lstm.rnn.bias_hh_l0
    assert torch.all(total[10:20] == 4.0) and torch.all(total[:10] == 0) and torch.all(total[20:] == 0)


def reference(model: RecurrentModel, x: torch.Tensor) -> torch.Tensor:
    """h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh), and the LSTM/GRU equations, in a plain loop."""
    p = {k: v.double() for k, v in model.state_dict().items()}
    inp = x.double()
    B, T, _ = inp.shape
    H = model.hidden_size
    for l in range(model.num_layers):
        w_ih, w_hh = p[f"rnn.weight_ih_l{l}"], p[f"rnn.weight_hh_l{l}"]
        b_ih, b_hh = p[f"rnn.bias_ih_l{l}"], p[f"rnn.bias_hh_l{l}"]
        h = torch.zeros(B, H, dtype=torch.float64)
        c = torch.zeros(B, H, dtype=torch.float64)
        outs = []
        for t in range(T):
            gi, gh = inp[:, t] @ w_ih.T + b_ih, h @ w_hh.T + b_hh
            if model.kind in ("irnn", "rnn-relu"):
                h = torch.relu(gi + gh)
            elif model.kind == "rnn-tanh":
                h = torch.tanh(gi + gh)
            elif model.kind == "lstm":
                i, f, g, o = (gi + gh).chunk(4, 1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
            else:  # gru
                r_i, z_i, n_i = gi.chunk(3, 1)
                r_h, z_h, n_h = gh.chunk(3, 1)
                r, z = torch.sigmoid(r_i + r_h), torch.sigmoid(z_i + z_h)
                n = torch.tanh(n_i + r * n_h)
                h = (1 - z) * n + z * h
            outs.append(h)
        inp = torch.stack(outs, 1)
    return inp[:, -1] @ p["readout.weight"].T + p["readout.bias"]


@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize("layers,T", [(1, 1), (1, 57), (2, 23), (3, 9)])
def test_output_equals_float64_reference_loop(kind, layers, T):
    torch.manual_seed(layers * 100 + T)
    m = RecurrentModel(kind, 3, 11, 2, layers, recurrent_std=0.3, input_std=0.5, init_scale=0.9).double()
    with torch.no_grad():  # move away from the special init so every term matters
        for name, p in m.named_parameters():
            if "bias" in name:
                p.normal_(0, 0.1)
    x = torch.randn(5, T, 3, dtype=torch.float64)
    out = m(x)
    ref = reference(m, x)
    assert out.shape == (5, 2)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 1e-10, rel


def test_shapes_for_all_models():
    for kind in MODEL_KINDS:
        m = RecurrentModel(kind, 2, 100, 1)
        assert m(torch.rand(16, 12, 2)).shape == (16, 1)
    with pytest.raises(ValueError):
        RecurrentModel("transformer", 2, 10, 1)
