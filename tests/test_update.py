"""irnn.engine.update: clipping and optimiser steps bitwise equal to torch's own functions."""
from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn

from irnn.engine import update
from irnn.models import RecurrentModel


def model_with_grads(seed: int, scale: float = 1.0) -> nn.Module:
    torch.manual_seed(seed)
    m = RecurrentModel("irnn", 2, 30, 1)
    for p in m.parameters():
        p.grad = torch.randn_like(p) * scale
    return m


@pytest.mark.parametrize("max_norm", [1e-3, 1.0, 1e6])
def test_clip_grad_norm_is_torch_clip_grad_norm(max_norm):
    a, b = model_with_grads(0), model_with_grads(0)
    a.readout.bias.grad = b.readout.bias.grad = None  # a parameter without a gradient is left out
    ours = update.clip_grad_norm(list(a.parameters()), max_norm)
    theirs = nn.utils.clip_grad_norm_(list(b.parameters()), max_norm)
    assert torch.equal(ours, theirs)
    for p, q in zip(a.parameters(), b.parameters()):
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the fast path's direct calls of the fused Adam kernel (Adam.step's own calls are not counted)."""
    calls = []
    real = torch._fused_adam_

    def counting(*args, **kwargs):
        if sys._getframe(1).f_globals["__name__"] == update.__name__:
            calls.append(len(args[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_fused_adam_", counting)
    return calls


def adam(m, **kw):
    return torch.optim.Adam(m.parameters(), fused=True, **kw)


@pytest.mark.parametrize("kw", [dict(lr=1e-3), dict(lr=3e-2, weight_decay=1e-2, betas=(0.8, 0.99), eps=1e-6),
                                dict(lr=1e-3, amsgrad=True), dict(lr=1e-3, maximize=True)])
def test_adam_steps_equal_step_for_several_optimisers_at_once(kw, kernel_calls):
    # three members: two share hyperparameters (one kernel call), the third has its own learning rate
    ours = [model_with_grads(s) for s in range(3)]
    theirs = copy.deepcopy(ours)
    opts_a = [adam(m, **{**kw, "lr": kw["lr"] * (1 + (i == 2))}) for i, m in enumerate(ours)]
    opts_b = [adam(m, **{**kw, "lr": kw["lr"] * (1 + (i == 2))}) for i, m in enumerate(theirs)]
    for step in range(4):
        for k, (ma, mb) in enumerate(zip(ours, theirs)):
            g = model_with_grads(100 * step + k, scale=10.0 ** (step - 2))
            for p, q, r in zip(ma.parameters(), mb.parameters(), g.parameters()):
                p.grad, q.grad = r.grad.clone(), r.grad.clone()
        if step == 2:  # the guard's rollback: state replaced, learning rate changed
            for oa, ob in zip(opts_a, opts_b):
                oa.load_state_dict(copy.deepcopy(ob.state_dict()))  # a copy, as from a checkpoint
                for o in (oa, ob):
                    o.param_groups[0]["lr"] *= 0.5
        update.adam_steps(opts_a)
        for o in opts_b:
            o.step()
        for ma, mb in zip(ours, theirs):
            for p, q in zip(ma.parameters(), mb.parameters()):
                assert torch.equal(p, q), (kw, step)
        for oa, ob in zip(opts_a, opts_b):
            for p, q in zip(oa.state.values(), ob.state.values()):
                assert all(torch.equal(p[k], q[k]) for k in q)
    n = len(list(ours[0].parameters()))
    plain = not (kw.get("amsgrad") or kw.get("maximize"))
    # step 0 initialises the state through step(); then the two members with equal hyperparameters share
    # one kernel call and the third has its own (amsgrad and maximize always go through step())
    assert kernel_calls == ([2 * n, n] * 3 if plain else [])


def test_adam_steps_falls_back_for_other_optimisers_and_hooks():
    ours, theirs = model_with_grads(0), model_with_grads(0)
    sgd_a = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)
    sgd_b = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9)
    update.adam_steps([sgd_a])
    sgd_b.step()
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), theirs.parameters()))
    calls = []
    opt = adam(ours, lr=1e-3)
    opt.step()  # state exists from here on
    opt.register_step_post_hook(lambda *a: calls.append(1))
    update.adam_steps([opt])
    assert calls == [1]  # hooks run: the plain step() was used


def test_zero_grad_clears_every_gradient():
    m = model_with_grads(0)
    opt = adam(m)
    update.zero_grad(opt)
    assert all(p.grad is None for p in m.parameters())


def test_adam_steps_uses_step_where_the_fast_path_would_differ(kernel_calls):
    m = model_with_grads(0)
    opt = adam(m, lr=1e-3)
    opt.step()
    p = next(iter(m.parameters()))
    fresh = RecurrentModel("irnn", 2, 30, 1)
    late = torch.optim.Adam(fresh.parameters(), lr=1e-3, fused=True)
    for q in fresh.parameters():
        q.grad = torch.ones_like(q)
    late.state[next(iter(fresh.parameters()))]  # a lookup leaves an empty state entry (a defaultdict)
    update.adam_steps([late])  # no state yet: step() initialises it
    assert kernel_calls == [] and all("exp_avg" in s for s in late.state.values())
    wrapped = []
    step = opt.step
    opt.step = lambda *a, **k: wrapped.append(1) or step(*a, **k)  # e.g. an LR scheduler's wrapper
    update.adam_steps([opt])
    assert wrapped == [1] and kernel_calls == []
    del opt.step
    update.adam_steps([opt])
    assert kernel_calls == [len(list(m.parameters()))]
    assert p.grad is not None


def test_clip_grad_norm_builds_no_graph_like_torch():
    # gradients that carry a graph (as after backward(create_graph=True)): clipping must not extend it
    def clipped(clip):
        m = model_with_grads(0)
        params = list(m.parameters())
        grads = torch.autograd.grad(m(torch.randn(3, 5, 2, generator=torch.Generator().manual_seed(0))).pow(2).sum(),
                                    params, create_graph=True)
        for p, g in zip(params, grads):
            p.grad = g
        total = clip(params, 1e-3)
        return total.requires_grad, [type(p.grad.grad_fn).__name__ for p in params], [p.grad.detach() for p in params]

    ours, theirs = clipped(update.clip_grad_norm), clipped(nn.utils.clip_grad_norm_)
    assert ours[:2] == theirs[:2] and ours[0] is False
    assert all(torch.equal(a, b) for a, b in zip(ours[2], theirs[2]))
