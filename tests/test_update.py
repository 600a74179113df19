"""irnn.engine.update: clipping and optimiser steps bitwise equal to torch's own functions."""
from __future__ import annotations

import copy

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


def adam(m, **kw):
    return torch.optim.Adam(m.parameters(), fused=True, **kw)


@pytest.mark.parametrize("kw", [dict(lr=1e-3), dict(lr=3e-2, weight_decay=1e-2, betas=(0.8, 0.99), eps=1e-6),
                                dict(lr=1e-3, amsgrad=True), dict(lr=1e-3, maximize=True)])
def test_adam_steps_equal_step_for_several_optimisers_at_once(kw):
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
