"""The CUDA-graph engine: fallback logic and the eager step on CPU; graph == eager on a GPU."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

from irnn.engine import cuda_graph as cg
from irnn.models import CELLS, MODEL_KINDS, RecurrentModel
from irnn.tasks.adding import generate

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_opt(name, params, lr=1e-2):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.RMSprop(params, lr=lr, momentum=0.5)


def batches(n, batch=4, seq_len=12, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [tuple(t.to(device) for t in generate(batch, seq_len, generator=g)) for _ in range(n)]


def model_and_opt(kind, opt, device="cpu", hidden=8, seed=0, lr=1e-2):
    torch.manual_seed(seed)
    model = RecurrentModel(kind, 2, hidden, 1).to(device)
    with torch.no_grad():  # off the identity (mildly: it must not explode), so every parameter gets a gradient
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model, make_opt(opt, list(model.parameters()), lr)


# --- CPU: capture is refused cleanly ------------------------------------------------------------

@pytest.mark.parametrize("kind", CELLS)
@pytest.mark.parametrize("opt", cg.SUPPORTED_OPTIMIZERS)
def test_can_capture_is_false_on_cpu(kind, opt):
    assert not cg.can_capture(torch.device("cpu"), kind, opt)
    assert not cg.can_capture("cpu", kind, opt)


def test_can_capture_rejects_unknown_models_and_optimizers():
    assert not cg.can_capture("cuda", "transformer", "adam")
    assert not cg.can_capture("cuda", "relu", "lbfgs")
    assert not cg.can_capture("cuda", None, "adam")  # a model on no nn.RNN/LSTM/GRU layer (IndRNN, a plugin's)
    assert cg.can_capture("cuda", "relu", "adam") == torch.cuda.is_available()


def test_optimizer_names():
    p = [torch.nn.Parameter(torch.zeros(2))]
    assert cg.optimizer_name(torch.optim.SGD(p, lr=0.1)) == "sgd"
    assert cg.optimizer_name(torch.optim.Adam(p)) == "adam"
    assert cg.optimizer_name(torch.optim.AdamW(p)) == "adam"
    assert cg.optimizer_name(torch.optim.RMSprop(p)) == "rmsprop"
    assert cg.optimizer_name(torch.optim.Adagrad(p)) == "adagrad"


def test_make_step_on_cpu_returns_none_without_warning():
    model, opt = model_and_opt("irnn", "adam")
    (x, y), = batches(1)
    before = copy.deepcopy(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cg.make_step(model, F.mse_loss, opt, 1.0, x, y) is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not opt.state and not isinstance(opt.param_groups[0]["lr"], torch.Tensor)


def test_graphed_step_needs_a_cuda_batch():
    model, opt = model_and_opt("irnn", "adam")
    (x, y), = batches(1)
    with pytest.raises(ValueError, match="CUDA"):
        cg.GraphedStep(model, F.mse_loss, list(model.parameters()), opt, 1.0, x, y)


def test_make_step_rejects_unknown_recurrence():
    model, opt = model_and_opt("irnn", "adam")
    (x, y), = batches(1)
    with pytest.raises(ValueError, match="recurrence"):
        cg.make_step(model, F.mse_loss, opt, 1.0, x, y, recurrence="numba")


def test_failed_capture_falls_back_and_warns_once(monkeypatch):
    monkeypatch.setattr(cg, "_warned", set())
    monkeypatch.setattr(cg, "can_capture", lambda *a: True)

    class Boom:
        def __init__(self, *a, **k):
            raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(cg, "GraphedStep", Boom)
    model, opt = model_and_opt("irnn", "adam")
    (x, y), = batches(1)
    with pytest.warns(RuntimeWarning, match="capture failed.*eager"):
        assert cg.make_step(model, F.mse_loss, opt, 1.0, x, y) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same reason again: silent
        assert cg.make_step(model, F.mse_loss, opt, 1.0, x, y) is None


def test_triton_recurrence_falls_back_for_lstm(monkeypatch):
    monkeypatch.setattr(cg, "_warned", set())
    monkeypatch.setattr(cg, "can_capture", lambda *a: True)
    model, opt = model_and_opt("lstm", "adam")
    (x, y), = batches(1)
    with pytest.warns(RuntimeWarning, match="Triton recurrence"):
        assert cg.make_step(model, F.mse_loss, opt, 1.0, x, y, recurrence="triton") is None


# --- CPU: the eager step that gets captured ------------------------------------------------------

@pytest.mark.parametrize("kind", ["irnn", "rnn-tanh", "lstm", "gru"])
@pytest.mark.parametrize("opt_name", cg.SUPPORTED_OPTIMIZERS)
def test_train_step_equals_a_plain_loop(kind, opt_name):
    m1, o1 = model_and_opt(kind, opt_name)
    m2, o2 = model_and_opt(kind, opt_name)
    params1 = list(m1.parameters())
    for x, y in batches(4):
        o1.zero_grad(set_to_none=True)
        loss1, norm1 = cg.train_step(m1, F.mse_loss, params1, o1, 0.5, x, y)
        o2.zero_grad()
        loss2 = F.mse_loss(m2(x), y)
        loss2.backward()
        norm2 = torch.nn.utils.clip_grad_norm_(m2.parameters(), 0.5)
        o2.step()
        assert loss1.dim() == 0 and norm1.dim() == 0 and not loss1.requires_grad
        assert torch.equal(loss1, loss2.detach()) and torch.equal(norm1, norm2)
        for p, q in zip(m1.parameters(), m2.parameters()):
            assert torch.equal(p.grad, q.grad) and torch.equal(p, q)


def test_train_step_clips_to_the_norm():
    model, opt = model_and_opt("irnn", "sgd")
    (x, y), = batches(1)
    y = y + 100.0  # a large loss, so that clipping is active
    _, norm = cg.train_step(model, F.mse_loss, list(model.parameters()), opt, 0.25, x, y)
    clipped = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters()))
    assert norm > 1.0 and clipped == pytest.approx(0.25, rel=1e-4)


@pytest.mark.parametrize("opt_name", cg.SUPPORTED_OPTIMIZERS)
@pytest.mark.parametrize("pretrained", [False, True])
def test_restore_undoes_warmup_steps(opt_name, pretrained):
    """Warm-up steps before a capture must leave no trace: parameters and state as before."""
    data = batches(6)
    m1, o1 = model_and_opt("irnn", opt_name)
    m2, o2 = model_and_opt("irnn", opt_name)
    params1 = list(m1.parameters())
    if pretrained:
        for x, y in data[:2]:
            for m, o in ((m1, o1), (m2, o2)):
                o.zero_grad()
                cg.train_step(m, F.mse_loss, list(m.parameters()), o, 1.0, x, y)
    snap = cg._snapshot(params1, o1)
    for x, y in data[2:5]:  # the warm-up, on other data
        o1.zero_grad(set_to_none=True)
        cg.train_step(m1, F.mse_loss, params1, o1, 1.0, x, y)
    cg._restore(params1, o1, snap)
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    x, y = data[5]
    for m, o in ((m1, o1), (m2, o2)):
        o.zero_grad(set_to_none=True)
        cg.train_step(m, F.mse_loss, list(m.parameters()), o, 1.0, x, y)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)


def test_restore_exactly_puts_state_and_groups_back():
    model, opt = model_and_opt("irnn", "adam")
    params = list(model.parameters())
    (x, y), = batches(1)
    cg.train_step(model, F.mse_loss, params, opt, 1.0, x, y)
    before_params = [p.detach().clone() for p in params]
    before_state = copy.deepcopy(opt.state_dict())
    snap = cg._snapshot(params, opt)
    cg._prepare_optimizer(opt, torch.device("cpu"), None)
    opt.zero_grad()
    cg.train_step(model, F.mse_loss, params, opt, 1.0, x, y)
    cg._restore_exactly(params, opt, snap)
    assert all(torch.equal(p, q) for p, q in zip(params, before_params))
    after = opt.state_dict()
    assert after["param_groups"] == before_state["param_groups"]
    for k, s in before_state["state"].items():
        for name, v in s.items():
            assert torch.equal(after["state"][k][name], v)


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])  # RMSprop's capturable path is CUDA-only
def test_prepared_optimizer_reads_its_lr_tensor(opt_name):
    """The prepared optimiser holds lr as a tensor; filling it changes the update like a float lr would."""
    m1, o1 = model_and_opt("irnn", opt_name, lr=0.05)
    m2, o2 = model_and_opt("irnn", opt_name, lr=0.05)
    lrs = cg._prepare_optimizer(o1, torch.device("cpu"), None)
    assert len(lrs) == 1 and lrs[0].dim() == 0 and o1.param_groups[0]["lr"] is lrs[0]
    assert lrs[0].item() == pytest.approx(0.05)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=cg._CAPTURABLE_WARNING)
        for i, (x, y) in enumerate(batches(4)):
            lr = [0.05, 0.01, 0.0, 0.02][i]
            lrs[0].fill_(lr)
            o2.param_groups[0]["lr"] = lr
            for m, o in ((m1, o1), (m2, o2)):
                o.zero_grad(set_to_none=True)
                cg.train_step(m, F.mse_loss, list(m.parameters()), o, 1.0, x, y)
            for p, q in zip(m1.parameters(), m2.parameters()):
                torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_prepare_reuses_lr_tensors_after_load_state_dict():
    model, opt = model_and_opt("irnn", "adam", lr=0.05)
    lrs = cg._prepare_optimizer(opt, torch.device("cpu"), None)
    saved = copy.deepcopy(opt.state_dict())
    saved["param_groups"][0]["lr"] = torch.tensor(0.003)
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["lr"] is not lrs[0]
    again = cg._prepare_optimizer(opt, torch.device("cpu"), lrs)
    assert again[0] is lrs[0] and opt.param_groups[0]["lr"] is lrs[0]
    assert lrs[0].item() == pytest.approx(0.003)


def test_fp32_matmuls_sets_and_restores_the_flags():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = True, True
        with cg.fp32_matmuls(False):
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        with pytest.raises(KeyError), cg.fp32_matmuls(False):
            raise KeyError
        assert torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


# --- GPU: the graph replays exactly the eager step -------------------------------------------------

def run_pair(kind, opt_name, steps=5, seq_len=30, fused=True, forward=None, lr=1e-2, hidden=16):
    """The same steps through a GraphedStep and eagerly (TF32 off in both); returns both models and the step."""
    dev = torch.device("cuda")
    m1, o1 = model_and_opt(kind, opt_name, dev, hidden=hidden, lr=lr)
    m2, o2 = model_and_opt(kind, opt_name, dev, hidden=hidden, lr=lr)
    data = batches(steps + 1, batch=8, seq_len=seq_len, device=dev)
    fwd1 = forward(m1) if forward else m1
    fwd2 = forward(m2) if forward else m2
    step = cg.GraphedStep(fwd1, F.mse_loss, list(m1.parameters()), o1, 1.0, *data[0], fused_optimizer=fused)
    for x, y in data[1:]:
        loss1, norm1 = step(x, y)
        with cg.fp32_matmuls(False):
            o2.zero_grad(set_to_none=True)
            loss2, norm2 = cg.train_step(fwd2, F.mse_loss, list(m2.parameters()), o2, 1.0, x, y)
        torch.testing.assert_close(loss1, loss2, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(norm1, norm2, rtol=1e-5, atol=1e-7)
        for p, q in zip(m1.parameters(), m2.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    return m1, o1, m2, o2, step, data


@cuda
@pytest.mark.parametrize("kind,opt_name", [("irnn", "adam"), ("irnn", "sgd"), ("irnn", "rmsprop"),
                                           ("rnn-tanh", "adam"), ("lstm", "adam"), ("gru", "sgd")])
def test_graphed_step_equals_eager(kind, opt_name):
    run_pair(kind, opt_name)


@cuda
def test_graphed_step_with_foreach_adam_equals_eager():
    run_pair("irnn", "adam", fused=False)


@cuda
def test_graphed_outputs_are_fresh_tensors():
    *_, step, data = run_pair("irnn", "adam", steps=1)
    a, _ = step(*data[0])
    b, _ = step(*data[1])
    assert a.data_ptr() != b.data_ptr()


@cuda
def test_graphed_step_rejects_other_shapes():
    *_, step, data = run_pair("irnn", "adam", steps=1)
    x, y = data[0]
    with pytest.raises(ValueError, match="captured step takes"):
        step(x[:, :-1], y)


@cuda
@pytest.mark.parametrize("opt_name", cg.SUPPORTED_OPTIMIZERS)
def test_set_lr_needs_no_recapture(opt_name):
    m1, o1, m2, o2, step, data = run_pair("irnn", opt_name, steps=1)
    graph = step.graph
    step.set_lr(0.0)
    before = [p.detach().clone() for p in m1.parameters()]
    step(*data[0])
    assert step.graph is graph
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), before))  # lr 0: no change
    o2.zero_grad(set_to_none=True)
    with cg.fp32_matmuls(False):
        # Keep the eager twin's optimiser state in step with the lr-0 update above.
        o2.param_groups[0]["lr"] = 0.0
        cg.train_step(m2, F.mse_loss, list(m2.parameters()), o2, 1.0, *data[0])
        for lr, (x, y) in zip([3e-3, 1e-2], data[1:3]):
            step.set_lr(lr)
            step(x, y)
            o2.param_groups[0]["lr"] = lr
            o2.zero_grad(set_to_none=True)
            cg.train_step(m2, F.mse_loss, list(m2.parameters()), o2, 1.0, x, y)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@cuda
@pytest.mark.parametrize("opt_name", cg.SUPPORTED_OPTIMIZERS)
def test_recapture_after_rollback_replays_the_same_steps(opt_name):
    dev = torch.device("cuda")
    model, opt = model_and_opt("irnn", opt_name, dev, hidden=16)
    data = batches(6, batch=8, seq_len=30, device=dev)
    step = cg.GraphedStep(model, F.mse_loss, list(model.parameters()), opt, 1.0, *data[0])
    for x, y in data[:2]:
        step(x, y)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    first = torch.stack([torch.stack(step(x, y)) for x, y in data[2:]])
    model.load_state_dict(saved_model)
    opt.load_state_dict(saved_opt)
    step.recapture()
    second = torch.stack([torch.stack(step(x, y)) for x, y in data[2:]])
    torch.testing.assert_close(first, second, rtol=1e-6, atol=0)
    step.reset()  # the alias irnn.engine's train loop calls; replays continue from the same state
    third = torch.stack(step(*data[2]))
    assert torch.isfinite(third).all()


@cuda
def test_make_step_on_cuda_returns_a_graphed_step():
    model, opt = model_and_opt("irnn", "adam", torch.device("cuda"), hidden=16)
    (x, y), = batches(1, batch=8, device="cuda")
    step = cg.make_step(model, F.mse_loss, opt, 1.0, x, y)
    assert isinstance(step, cg.GraphedStep)
    loss, norm = step(x, y)
    assert loss.is_cuda and torch.isfinite(loss) and torch.isfinite(norm)


@cuda
def test_graphed_gradients_are_fp32_grade_at_t150():
    """Clip off: the gradients the graph leaves in .grad match a float64 recomputation to 1e-4."""
    dev = torch.device("cuda")
    model, opt = model_and_opt("irnn", "adam", dev, hidden=100)
    data = batches(2, batch=16, seq_len=150, device=dev)
    step = cg.GraphedStep(model, F.mse_loss, list(model.parameters()), opt, 1e9, *data[0])
    ref = copy.deepcopy(model).double().cpu()
    x, y = data[1]
    F.mse_loss(ref(x.double().cpu()), y.double().cpu()).backward()
    step(x, y)
    g = torch.cat([p.grad.flatten().double().cpu() for p in model.parameters()])
    g64 = torch.cat([p.grad.flatten() for p in ref.parameters()])
    assert ((g - g64).norm() / g64.norm()).item() < 1e-4


@cuda
def test_graphed_triton_forward_equals_eager():
    tr = pytest.importorskip("irnn.engine.triton_rnn")
    if not tr.available():
        pytest.skip("triton unavailable")
    run_pair("irnn", "adam", forward=tr.model_forward, hidden=32)


def test_sgd_with_dampening_is_refused_before_its_first_step():
    model, _ = model_and_opt("irnn", "sgd")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, dampening=0.5)
    with pytest.raises(ValueError, match="dampening"):
        cg._prepare_optimizer(opt, torch.device("cpu"), None)
