"""Ensembles: N stacked members follow exactly the trajectories they follow alone."""
import pytest
import torch

from irnn.engine import TrainStep, fused, make_forward
from irnn.engine.ensemble import StackedStep, clip_per_member, stackable
from irnn.models import RecurrentModel
from irnn.tasks import make_adding


def _member(kind, seed, init_scale, dtype):
    torch.manual_seed(seed)
    return RecurrentModel(kind, 2, 13, 1, 2, init_scale=init_scale, recurrent_std=0.3, input_std=0.3).to(dtype)


@pytest.mark.parametrize("kind,opt_name", [("irnn", "adam"), ("rnn-tanh", "sgd"), ("irnn", "rmsprop")])
def test_stacked_step_matches_members_trained_alone(kind, opt_name):
    dtype = torch.float64
    seeds, lrs, clips, scales = [0, 1, 2, 3], [1e-2, 3e-3, 1e-3, 3e-2], [1.0, 0.05, 10.0, 0.5], [1.0, 0.5, 0.9, 1.0]
    tasks = [make_adding(17, train_size=64, test_size=8, seed=s) for s in seeds]

    def make_opt(m, lr):
        if opt_name == "adam":
            return torch.optim.Adam(m.parameters(), lr=lr)
        if opt_name == "sgd":
            return torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9)
        return torch.optim.RMSprop(m.parameters(), lr=lr, momentum=0.5)

    alone = [_member(kind, s, sc, dtype) for s, sc in zip(seeds, scales)]
    stacked = [_member(kind, s, sc, dtype) for s, sc in zip(seeds, scales)]
    assert stackable(stacked)
    alone_steps = [TrainStep(make_forward(m, "fused"), t.loss_fn, list(m.parameters()), make_opt(m, lr), c)
                   for m, t, lr, c in zip(alone, tasks, lrs, clips)]
    opts = [make_opt(m, lr) for m, lr in zip(stacked, lrs)]
    step = StackedStep(tasks[0].loss_fn)
    for i in range(6):
        batches = [t.batch(i, 8, s) for t, s in zip(tasks, seeds)]
        x = torch.stack([b[0] for b in batches]).to(dtype)
        y = torch.stack([b[1] for b in batches]).to(dtype)
        losses, norms = step(stacked, opts, clips, x, y)
        for k, (s, b) in enumerate(zip(alone_steps, batches)):
            loss_k, norm_k = s(b[0].to(dtype), b[1].to(dtype))
            torch.testing.assert_close(losses[k], loss_k, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(norms[k], norm_k, rtol=1e-12, atol=1e-14)
    for a, b in zip(alone, stacked):
        for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(pb, pa, rtol=1e-10, atol=1e-13, msg=name)
    # the clip limits differ per member, so some were clipped and some not: each kept its own
    assert not torch.equal(alone[0].rnn.weight_hh_l0, alone[1].rnn.weight_hh_l0)


def test_clip_per_member_equals_clip_grad_norm():
    torch.manual_seed(0)
    groups = [[torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))] for _ in range(3)]
    clones = [[torch.nn.Parameter(p.detach().clone()) for p in g] for g in groups]
    for g, c in zip(groups, clones):
        for p, q in zip(g, c):
            p.grad = torch.randn_like(p) * 3
            q.grad = p.grad.clone()
    limits = [0.5, 100.0, 2.0]
    norms = clip_per_member(groups, limits)
    for k, (c, lim) in enumerate(zip(clones, limits)):
        ref = torch.nn.utils.clip_grad_norm_(c, lim)
        torch.testing.assert_close(norms[k], ref)
        for p, q in zip(groups[k], c):
            torch.testing.assert_close(p.grad, q.grad)


def test_lstm_is_not_stackable():
    assert not stackable([RecurrentModel("lstm", 2, 5, 1), RecurrentModel("lstm", 2, 5, 1)])
    assert not stackable([RecurrentModel("irnn", 2, 5, 1), RecurrentModel("irnn", 2, 6, 1)])
    assert not stackable([RecurrentModel("irnn", 2, 5, 1), RecurrentModel("rnn-tanh", 2, 5, 1)])


def test_train_many_stacks_members_into_ordinary_runs_with_per_member_guard(tmp_path):
    import json

    import irnn
    from irnn.runs.store import WALL_CLOCK_KEYS
    from irnn.train import train, train_many
    from irnn.train.ensemble import ensemble_key

    torch.set_num_threads(1)
    base = dict(seq_len=15, steps=90, eval_every=30, log_every=10, ckpt_every=10, train_size=400, test_size=100,
                quiet=True, batch_size=8, lr=1e-3)
    cfgs = [irnn.Config(**base, seed=0), irnn.Config(**base, seed=1, clip_norm=0.1, init_scale=0.5),
            # member 2 meets an absurd learning rate for a few steps: it alone must roll back
            irnn.Config(**base, seed=2, inject_lr_spike="40:45:1e5", guard_retries=20)]
    assert len({ensemble_key(c) for c in cfgs}) == 1 and ensemble_key(cfgs[0]) is not None
    assert ensemble_key(irnn.Config(**{**base, "model": "lstm"})) is None
    runs = train_many(cfgs, [tmp_path / f"m{i}" for i in range(3)])
    alone = [train(c, out_dir=tmp_path / f"a{i}") for i, c in enumerate(cfgs)]

    def lines(run):
        return [{k: v for k, v in json.loads(l).items() if k not in WALL_CLOCK_KEYS}
                for l in (run.path / "metrics.jsonl").read_text().splitlines()]

    for i, (r, a) in enumerate(zip(runs, alone)):
        assert r.summary["status"] == a.summary["status"] == "completed", (r.summary["reason"], a.summary["reason"])
        got, ref = lines(r), lines(a)
        assert [(l["step"], l["kind"]) for l in got] == [(l["step"], l["kind"]) for l in ref]
        first_eval = next(j for j, l in enumerate(ref) if l["kind"] == "eval")
        assert got[first_eval]["test_mse"] == pytest.approx(ref[first_eval]["test_mse"], rel=1e-4)
        events = [l for l in got if l["kind"] == "event"]
        assert (len(events) > 0) == (i == 2), events
        for key in ("guard_interventions", "spikes_absorbed", "skipped_batches"):
            assert r.summary[key] == a.summary[key]


def test_cpu_stacks_stay_within_the_cache_budget():
    """Measured on the 2-core CPU: stacks of members with over 1 MiB of hidden states each ran at
    0.79-1.0x of training them one after another (T=400: 0.79-0.90x on one thread), members under it
    at 1.0-1.37x; so those train alone."""
    from irnn.config import from_dict
    from irnn.train.ensemble import MAX_ENSEMBLE, plan, stack_limit

    def cfg(**kw):
        return from_dict({"device": "cpu", "batch_size": 16, "hidden_size": 100, **kw})

    assert stack_limit(cfg(seq_len=150)) == MAX_ENSEMBLE == 16  # 0.92 MiB a member
    assert stack_limit(cfg(seq_len=200)) == 1  # 1.22 MiB
    assert stack_limit(cfg(seq_len=400)) == 1
    assert stack_limit(cfg(seq_len=150, num_layers=2)) == 1  # 1.83 MiB over both layers
    assert stack_limit(cfg(task="mnist", batch_size=32, data_source="sample5k")) == 1
    assert stack_limit(cfg(task="mnist", batch_size=16, data_source="digits")) == 16
    cfgs = [cfg(seq_len=400, seed=s) for s in range(4)] + [cfg(seq_len=150, seed=s) for s in range(19)]
    groups = plan(cfgs)
    if not fused.available():  # no fused engine here: nothing is stacked
        assert all(len(g) == 1 for g in groups)
    else:
        assert [len(g) for g in groups] == [1, 1, 1, 1, 16, 3] and sorted(i for g in groups for i in g) == list(range(23))
    assert all(len(g) == 1 for g in plan(cfgs, ensemble=False))


@pytest.mark.parametrize("threads", [1, 2])
def test_stacked_member_is_bitwise_the_run_alone(threads):
    # float32 as in training, Adam fused as make_optimizer builds it, clipping active for some members:
    # every loss, norm and parameter of every step equals the member trained alone, on 1 or 2 threads.
    if not fused.available():
        pytest.skip("the fused C++ engine is unavailable (IRNN_NO_EXTENSION)")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        seeds, clips = [0, 1, 2], [0.05, 1.0, 100.0]
        tasks = [make_adding(30, train_size=128, test_size=8, seed=s) for s in seeds]
        alone = [_member("irnn", s, 1.0, torch.float32) for s in seeds]
        stacked = [_member("irnn", s, 1.0, torch.float32) for s in seeds]
        make_opt = lambda m: torch.optim.Adam(m.parameters(), lr=3e-3, fused=True)  # noqa: E731
        steps = [TrainStep(make_forward(m, "fused"), t.loss_fn, list(m.parameters()), make_opt(m), c)
                 for m, t, c in zip(alone, tasks, clips)]
        opts = [make_opt(m) for m in stacked]
        step = StackedStep(tasks[0].loss_fn)
        clipped = 0
        for i in range(25):
            batches = [t.batch(i, 16, s) for t, s in zip(tasks, seeds)]
            losses, norms = step(stacked, opts, clips, torch.stack([b[0] for b in batches]),
                                 torch.stack([b[1] for b in batches]))
            for k, (one, b) in enumerate(zip(steps, batches)):
                loss_k, norm_k = one(*b)
                assert torch.equal(losses[k], loss_k) and torch.equal(norms[k], norm_k), (i, k)
                clipped += bool(norm_k > clips[k])
            for a, b in zip(alone, stacked):
                assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters())), i
        assert clipped > 0
    finally:
        torch.set_num_threads(before)
