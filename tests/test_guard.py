"""Behaviour: the divergence guard absorbs spikes that pass, rolls back past the batches of one that
does not, counts retries per incident, and never stops a run whose loss is finite.

Runs are tiny (CPU, ``engine=torch``, one thread) and trained in this process, except the ones
that are killed: those run in a subprocess that SIGKILLs itself at a chosen metrics record.
"""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import irnn
from irnn.runs import checkpoint as ckpt
from irnn.runs.store import WALL_CLOCK_KEYS, iter_metrics
from irnn.train.guard import DivergenceGuard
from irnn.train.loop import train as irnn_train  # the module irnn.train shadows irnn.train()

STEPS = 300
TINY = dict(seq_len=10, hidden_size=16, batch_size=8, train_size=500, test_size=100, steps=STEPS, log_every=10,
            eval_every=50, ckpt_every=20, engine="torch", threads=1, quiet=True)
NAN_SPIKE = "130:1e30"  # batch 130's inputs x 1e30: an infinite loss, then NaN weights
SMALL_SPIKE = "130:30"  # batch 130's inputs x 30: one loss of about 70 (recent median 0.15), then back to normal


def train(tmp: Path, name: str, **kw) -> irnn.Run:
    threads = torch.get_num_threads()
    try:
        return irnn_train(irnn.Config(**{**TINY, **kw}), out_dir=tmp / name, progress=False)
    finally:  # undo the process-wide settings a Trainer makes
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)


def rows(run: irnn.Run | Path) -> list[dict]:
    """metrics.jsonl without its wall-clock fields."""
    path = run.path if isinstance(run, irnn.Run) else run
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK_KEYS} for r in iter_metrics(path / "metrics.jsonl")]


def events(run, name: str | None = None) -> list[dict]:
    return [r for r in rows(run) if r["kind"] == "event" and name in (None, r["event"])]


def curves(run) -> list[dict]:
    return [r for r in rows(run) if r["kind"] != "event"]


def final_state(run) -> dict:
    path = run.path if isinstance(run, irnn.Run) else run
    return ckpt.load(path / "checkpoints" / f"ckpt-{STEPS:09d}.pt")


def assert_same_state(a: dict, b: dict, *, loop: bool = True) -> None:
    assert a["step"] == b["step"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"parameter {k} differs"
    for p, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b["optimizer"]["state"][p][k]), f"optimizer state {p}/{k} differs"
    if loop:
        assert a["loop"] == b["loop"] | {"wall_time_s": a["loop"]["wall_time_s"]}


# -- the guard alone ------------------------------------------------------------------------------------
def test_scan_absorbs_a_passing_spike_and_flags_sustained_or_non_finite_loss():
    guard = DivergenceGuard(factor=16.0, window=10, floor=0.5)
    calm = [1.0] * 10
    # a spike (> 16 x median 1) followed by losses under sqrt(16) x 1 = 4: absorbed when it can no longer tip
    scan = guard.scan(calm, None, 100, [20.0] + [1.0] * 9, [1.0] * 10)
    assert scan.bad is None and scan.watch is None
    [(i, closed)] = scan.closed
    assert (i, closed["step"], closed["above"], closed["seen"], closed["outcome"]) == (5, 100, 1, 6, "absorbed")
    # six of ten watched steps above 4: diverging at the sixth, the step that tips it
    scan = guard.scan(calm, None, 100, [20.0, 5.0, 1.0, 5.0, 1.0, 5.0, 1.0, 5.0, 5.0], [1.0] * 9)
    assert scan.bad is not None and scan.bad[0] == 8 and scan.bad[2] is True
    assert "stayed above 4 for 6 of 9 steps after a spike to 20 at step 100" in scan.bad[1]
    # ... unless the incident's retries are spent: then the watch closes as "continued"
    scan = guard.scan(calm, None, 100, [20.0, 5.0, 1.0, 5.0, 1.0, 5.0, 1.0, 5.0, 5.0], [1.0] * 9, tolerate=True)
    assert scan.bad is None and [c["outcome"] for _, c in scan.closed] == ["continued"]
    # a watch carries over to the next chunk, and the last chunk of a run judges it on what it saw
    scan = guard.scan(calm, None, 100, [20.0, 5.0], [1.0, 1.0])
    assert scan.bad is None and scan.watch["seen"] == 2 and scan.watch["above"] == 2
    assert guard.scan(scan.recent, scan.watch, 102, [1.0], [1.0]).watch["seen"] == 3
    assert guard.scan(scan.recent, scan.watch, 102, [1.0], [1.0], final=True).bad is not None  # 2 of 3 high
    # non-finite values are bad at once, and even with the retries spent
    for losses, norms in (([1.0, float("nan")], [1.0, 1.0]), ([1.0, 1.0], [1.0, float("inf")])):
        scan = guard.scan(calm, None, 0, losses, norms, tolerate=True)
        assert scan.bad[0] == 1 and scan.bad[2] is False and "non-finite" in scan.bad[1]
    # below the floor nothing is a spike, however far above the median
    assert guard.scan([0.01] * 10, None, 0, [0.4] * 5, [1.0] * 5).watch is None


# -- runs -------------------------------------------------------------------------------------------
def test_single_spike_is_absorbed_without_rollback_exactly_as_without_guard(tmp_path):
    guarded = train(tmp_path, "guarded", inject_spike=SMALL_SPIKE)
    raw = train(tmp_path, "raw", inject_spike=SMALL_SPIKE, guard=False)
    plain = train(tmp_path, "plain")
    [absorbed] = events(guarded)
    assert absorbed["event"] == "spike_absorbed" and absorbed["spike_step"] == 130
    assert absorbed["loss"] > 20 * absorbed["median"] and absorbed["above"] <= 25  # of guard_window = 50
    s = guarded.summary
    assert s["status"] == "completed" and (s["spikes_absorbed"], s["guard_interventions"], s["skipped_batches"]) == (1, 0, 0)
    # the guard only watched: every curve line and the final state equal the unguarded run
    assert curves(guarded) == curves(raw) and not events(raw)
    assert_same_state(final_state(guarded), final_state(raw), loop=False)
    # and the spike was real: the run without it differs after batch 130
    assert curves(plain)[:13] == curves(guarded)[:13] and curves(plain) != curves(guarded)


def test_non_finite_spike_rolls_back_skips_its_batches_and_the_run_passes(tmp_path):
    run = train(tmp_path, "nan", inject_spike=NAN_SPIKE)
    plain = train(tmp_path, "plain")
    s = run.summary
    assert s["status"] == "completed" and s["steps"] == STEPS
    div, skip, rec = events(run)
    assert div["event"] == "divergence" and div["action"] == "rollback" and "non-finite" in div["reason"]
    assert (div["step"], div["rollback_to"], div["retry"], div["new_lr"]) == (131, 120, 1, pytest.approx(5e-4))
    # every batch the abandoned attempt drew (120..130) is skipped: the retry never meets batch 130
    assert (skip["event"], skip["first"], skip["last"], skip["count"]) == ("skip_batches", 120, 130, 11)
    assert rec["event"] == "recovered" and rec["step"] == 200 and rec["retries"] == 1  # ckpt >= 131 + 50
    assert (s["guard_interventions"], s["skipped_batches"], s["spikes_absorbed"]) == (1, 11, 0)
    assert final_state(run)["loop"]["data_offset"] == 11
    assert ckpt.load(run.path / "checkpoints" / "best.pt")["step"] == s["best_step"]
    # up to the rollback target the run is the plain run; then the lr is halved until it recovers
    assert curves(run)[:14] == curves(plain)[:14]  # 12 train lines and 2 evals up to step 120
    lrs = {r["step"]: r["lr"] for r in curves(run) if r["kind"] == "train"}
    assert all(lrs[t] == pytest.approx(5e-4) for t in range(130, 201, 10))
    assert all(lrs[t] == pytest.approx(1e-3) for t in range(210, STEPS + 1, 10))
    assert sorted(lrs) == list(range(10, STEPS + 1, 10))  # the abandoned attempt's lines are gone


def test_retries_count_per_incident(tmp_path):
    # two incidents of one rollback each: the old guard (5 retries over the whole run) would have
    # stopped this run at the second with guard_retries=1
    run = train(tmp_path, "two", guard_retries=1, guard_lr_decay=1e-4, inject_spike=NAN_SPIKE,
                inject_lr_spike="230:235:1e5")
    assert run.summary["status"] == "completed", run.summary["reason"]
    kinds = [(e["event"], e.get("action"), e.get("retry")) for e in events(run)]
    assert kinds == [("divergence", "rollback", 1), ("skip_batches", None, None), ("recovered", None, None)] * 2
    first, second = events(run, "skip_batches")
    assert (first["first"], first["count"]) == (120, 11)
    assert second["first"] == events(run, "divergence")[1]["rollback_to"] + 11  # the offset carried over
    assert run.summary["guard_interventions"] == 2 and run.summary["skipped_batches"] == 11 + second["count"]
    # the lr came back after the first incident: the second spike met the full lr x 1e5
    assert events(run, "divergence")[1]["lr"] == pytest.approx(1e-3 * 1e5)


def test_retries_spent_finite_loss_goes_on_unguarded_non_finite_stops(tmp_path):
    # lr x 1e4 for five steps: the loss stays high for most of the watch but is finite
    spent = train(tmp_path, "spent", guard_retries=0, inject_lr_spike="105:110:1e4")
    raw = train(tmp_path, "raw", guard=False, inject_lr_spike="105:110:1e4")
    [cont] = events(spent)
    assert cont["event"] == "divergence" and cont["action"] == "continue" and "stayed above" in cont["reason"]
    assert spent.summary["status"] == raw.summary["status"] == "completed"
    assert curves(spent) == curves(raw)  # as if there were no guard: never worse than none
    # non-finite with no retry left: nothing to continue from
    stop = train(tmp_path, "stop", guard_retries=2, inject_lr_spike="105:110:1e5")
    div = events(stop, "divergence")
    assert [e["action"] for e in div] == ["rollback", "rollback", "stop"] and "non-finite" in div[-1]["reason"]
    s = stop.summary
    assert s["status"] == "diverged" and s["guard_interventions"] == 2 and s["steps"] < STEPS
    assert "gave up after 2 rollbacks in this incident (guard_retries=2)" in s["reason"]
    assert [e["count"] for e in events(stop, "skip_batches")] == [div[0]["step"] - 100, div[1]["step"] - 100]


def test_rollbacks_restore_a_copy_of_the_snapshot(tmp_path):
    """Two rollbacks to one checkpoint: the second restores the checkpoint as written, not the
    optimiser state that the first retry went on to update in place."""
    from irnn.train.loop import open_trainer

    threads = torch.get_num_threads()
    try:
        t = open_trainer(irnn.Config(**TINY, inject_lr_spike="105:110:1e5"), out_dir=tmp_path / "copy", progress=False)
        t.begin()
        while t.state.step < 100:
            t.after_chunk(*t.run_chunk())
        on_disk = ckpt.load(tmp_path / "copy" / "checkpoints" / f"ckpt-{100:09d}.pt")
        restored = 0
        while restored < 2:
            t.after_chunk(*t.run_chunk())
            if t.state.step == 100:  # only a rollback lands here: chunks from 100 end later
                assert_same_state(t._state_dict(), on_disk, loop=False)
                restored += 1
        assert [e["action"] for e in events(tmp_path / "copy", "divergence")] == ["rollback", "rollback"]
        t.end("interrupted")
    finally:
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)


# -- resume through an incident ------------------------------------------------------------------------
KILLER = """
import json, os, signal, sys
import irnn
n = 0
def on_record(record):
    global n
    n += 1
    if n == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
irnn.train(irnn.Config(**json.loads(sys.argv[1])), out_dir=sys.argv[2], progress=False, on_record=on_record)
"""


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_between_rollback_and_recovery_then_resume_is_exact(tmp_path, seed):
    # the uninterrupted run, with every record in the order it was written (abandoned lines included)
    cfg = dict(TINY, inject_lr_spike="105:110:3000")  # two rollbacks to step 100, then the spike passes
    written = []
    threads = torch.get_num_threads()
    try:
        ref = irnn_train(irnn.Config(**cfg), out_dir=tmp_path / "ref", progress=False, on_record=written.append)
    finally:
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)
    kinds = [r.get("event") for r in written]
    first, recovered = kinds.index("divergence"), kinds.index("recovered")
    assert kinds.count("divergence") >= 2 and first < recovered
    # a random record from the first rollback event up to the recovery (seeded: the failing point repeats)
    kill_at = random.Random(seed).randint(first + 1, recovered + 1)  # 1-based: SIGKILL once it is written
    proc = subprocess.run([sys.executable, "-c", KILLER, json.dumps(cfg), str(tmp_path / "killed"), str(kill_at)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert summary["status"] == "running"
    r = subprocess.run([sys.executable, "-m", "irnn.cli", "train", "--resume", str(tmp_path / "killed")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    [resumed] = [int(l.split("resuming from step ")[1].split()[0]) for l in r.stderr.splitlines() if "resuming" in l]
    assert 100 <= resumed < STEPS, r.stderr
    got, want = rows(tmp_path / "killed"), rows(ref)
    assert got == want, f"killed at record {kill_at} ({written[kill_at - 1]})"
    assert_same_state(final_state(tmp_path / "killed"), final_state(ref))
    assert json.loads((tmp_path / "killed" / "summary.json").read_text())["skipped_batches"] == ref.summary["skipped_batches"]


# -- ensembles ----------------------------------------------------------------------------------------
def test_stacked_members_guard_exactly_as_alone(tmp_path):
    from irnn.engine import fused
    from irnn.train import train_many
    from irnn.train.ensemble import ensemble_key

    if not fused.available():
        pytest.skip("the fused C++ engine is unavailable: nothing is stacked")
    base = {**TINY, "engine": "auto", "steps": 200}
    cfgs = [irnn.Config(**base, seed=0), irnn.Config(**base, seed=1, inject_spike=NAN_SPIKE),
            irnn.Config(**base, seed=2, inject_spike=SMALL_SPIKE)]
    assert len({ensemble_key(c) for c in cfgs}) == 1
    threads = torch.get_num_threads()
    try:
        stacked = train_many(cfgs, [tmp_path / f"m{i}" for i in range(3)])
        alone = [irnn_train(c, out_dir=tmp_path / f"a{i}", progress=False) for i, c in enumerate(cfgs)]
    finally:
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)
    assert [r.summary["engine"] for r in stacked] == ["ensemble-fused"] * 3
    assert [[e["event"] for e in events(r)] for r in stacked] == [
        [], ["divergence", "skip_batches", "recovered"], ["spike_absorbed"]]
    for r, a in zip(stacked, alone):
        assert r.summary["status"] == a.summary["status"] == "completed"
        assert rows(r) == rows(a)
        assert_same_state(ckpt.load(r.path / "checkpoints" / "ckpt-000000200.pt"),
                          ckpt.load(a.path / "checkpoints" / "ckpt-000000200.pt"))
        for key in ("guard_interventions", "spikes_absorbed", "skipped_batches"):
            assert r.summary[key] == a.summary[key]


def test_a_study_without_the_guard_is_the_raw_runs_of_the_same_members(tmp_path, capsys):
    """`irnn reproduce --no-guard` trains the same members raw, in a folder of its own, and says so in the report;
    where the guard never rolled back, each guarded member's curve is the raw member's, value for value."""
    from irnn.cli import main
    from irnn.experiments.report import NO_GUARD_TEXT

    argv = ["reproduce", "adding", "--lengths", "10", "--steps", "60", "--seeds", "1", "--models", "irnn,rnn-relu",
            "--workers", "1", "--out", str(tmp_path)]
    assert main(argv) == 0 and main([*argv, "--no-guard"]) == 0
    capsys.readouterr()
    guarded, raw = tmp_path / "adding-seed-quick", tmp_path / "adding-seed-quick-noguard"
    names = sorted(p.name for p in (raw / "members").iterdir())
    assert names == sorted(p.name for p in (guarded / "members").iterdir()) and len(names) == 2
    for name in names:
        assert json.loads((raw / "members" / name / "config.json").read_text())["config"]["guard"] is False
        assert json.loads((guarded / "members" / name / "config.json").read_text())["config"]["guard"] is True
        assert not events(guarded / "members" / name, "divergence")
        assert curves(raw / "members" / name) == curves(guarded / "members" / name)
    assert NO_GUARD_TEXT in (raw / "report.md").read_text()
    assert NO_GUARD_TEXT not in (guarded / "report.md").read_text()
