"""Behaviour: training survives SIGKILL, signals, divergence and damaged checkpoints, and loses nothing.

The tests run the real command line in subprocesses on a tiny budget (a few train in this process
to save a start-up) and compare against an uninterrupted reference run of the same config:
``metrics.jsonl`` minus its wall-clock fields and the final model and optimiser state must be
identical (CPU, ``--engine torch``; one test repeats this with ``engine=auto``).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from irnn import Config
from irnn import train as irnn_train
from irnn.runs import checkpoint as ckpt
from irnn.runs.store import WALL_CLOCK_KEYS, RunDir, atomic_write_bytes

STEPS = 300
TINY = ["--seq-len", "10", "--hidden-size", "16", "--batch-size", "8", "--train-size", "500", "--test-size", "100",
        "--steps", str(STEPS), "--log-every", "10", "--eval-every", "50", "--ckpt-every", "20",
        "--engine", "torch", "--threads", "1", "--quiet"]
# Adam lr 1e-3 x 3000 for steps 105-110: the loss explodes and stays high, the guard rolls back to
# step 100 twice (each time skipping the batches of the abandoned attempt and halving the lr, the
# spike with it) and the third try passes. (x 1000 passes on its own: the guard only watches it.)
SPIKE = ["--inject-lr-spike", "105:110:3000"]


def irnn_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "irnn.cli", *args]


def irnn(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(irnn_cmd(*args), capture_output=True, text=True, timeout=timeout)


def resume(run: Path) -> subprocess.CompletedProcess:
    return irnn("train", "--resume", str(run))


def lines(run: Path) -> list[str]:
    """metrics.jsonl as canonical JSON strings without wall-clock fields, in file order."""
    out = []
    for raw in (run / "metrics.jsonl").read_text().splitlines():
        obj = json.loads(raw)
        out.append(json.dumps({k: v for k, v in obj.items() if k not in WALL_CLOCK_KEYS}, sort_keys=True))
    return out


def final_state(run: Path, step: int = STEPS) -> dict:
    return ckpt.load(run / "checkpoints" / f"ckpt-{step:09d}.pt")


def assert_same_state(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"parameter {k} differs"
    for p, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b["optimizer"]["state"][p][k]), f"optimizer state {p}/{k} differs"
    assert a["loop"] == b["loop"] | {"wall_time_s": a["loop"]["wall_time_s"]}


def assert_same_run(run: Path, ref: Path) -> None:
    """Identical metrics (wall clock aside), no line lost or repeated, identical final state."""
    got, want = lines(run), lines(ref)
    assert len(got) == len(want), f"{len(got)} metric lines, the reference has {len(want)}"
    assert got == want
    assert_same_state(final_state(run), final_state(ref))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == STEPS


def assert_one_step_per_line(run: Path) -> None:
    seen = [(json.loads(l)["step"], json.loads(l)["kind"]) for l in lines(run) if '"event"' not in l]
    assert len(seen) == len(set(seen)), "a train/eval line is repeated"
    assert [s for s, _ in seen] == sorted(s for s, _ in seen)


def in_process(fn, *args, **kwargs):
    """Train in this process (saves a start-up), then undo the process-wide settings a Trainer makes."""
    threads = torch.get_num_threads()
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)


def n_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def start_and_signal(out: Path, name: str, sig: int, *, after_lines: int | None = None,
                     after_event: bool = False, extra: tuple[str, ...] = (), args: list[str] = TINY,
                     resume_run: Path | None = None) -> subprocess.CompletedProcess:
    """Start (or resume) a run and send ``sig`` once its metrics file has ``after_lines`` lines
    (or an event line); returns the finished process."""
    args = ("train", "--resume", str(resume_run)) if resume_run else ("train", *args, *extra, "--out", str(out),
                                                                       "--name", name)
    metrics = (resume_run or out / name) / "metrics.jsonl"
    proc = subprocess.Popen(irnn_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if after_event and metrics.exists() and b'"event"' in metrics.read_bytes():
            break
        if after_lines is not None and n_lines(metrics) >= after_lines:
            break
        time.sleep(0.005)
    if proc.poll() is None:
        proc.send_signal(sig)
    out_, err = proc.communicate(timeout=240)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out_, err)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def finished(runs):
    """The uninterrupted runs, trained side by side (both cores busy): name -> finished process."""
    jobs = {"reference": (), "again": (), "spiked": tuple(SPIKE),
            "exhausted": ("--inject-lr-spike", "105:110:1e5", "--guard-retries", "2"),
            "raw": ("--no-guard", "--inject-lr-spike", "105:110:100000")}
    procs = {name: subprocess.Popen(irnn_cmd("train", *TINY, *extra, "--out", str(runs), "--name", name),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, extra in jobs.items()}
    done = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    for name in ("reference", "again", "spiked"):
        assert done[name].returncode == 0, done[name].stderr
    return done


@pytest.fixture(scope="module")
def reference(runs, finished):
    return runs / "reference"


@pytest.fixture(scope="module")
def spiked(runs, finished):
    return runs / "spiked"


# -- determinism and exact resume -----------------------------------------------------------------------
def test_same_seed_gives_identical_metrics_and_parameters(runs, reference):
    assert_same_run(runs / "again", reference)
    assert_one_step_per_line(reference)
    assert len(lines(reference)) == STEPS // 10 + STEPS // 50


def test_killed_and_signalled_at_random_moments_then_resumed_is_exact(runs, reference):
    """SIGKILL, SIGINT, SIGTERM, then SIGKILL after a random sleep; each resume continues the run."""
    rng = random.Random()
    run = runs / "killed"
    metrics = run / "metrics.jsonl"
    resumed_from = []
    for attempt, sig in enumerate((signal.SIGKILL, signal.SIGINT, signal.SIGTERM)):
        # at a random metric line; from line 3 on, ckpt-20 exists; later tries wait for new lines
        target = rng.randrange(3, 20) if attempt == 0 else n_lines(metrics) + rng.randrange(2, 6)
        target = min(target, STEPS // 10 + STEPS // 50 - 3)  # the signal must land before the run ends
        r = start_and_signal(runs, "killed", sig, after_lines=target, resume_run=run if attempt else None)
        assert "Traceback" not in r.stderr, r.stderr
        resumed_from += [l for l in r.stderr.splitlines() if "resuming from step" in l]
        summary = json.loads((run / "summary.json").read_text())
        if sig == signal.SIGKILL:
            assert r.returncode == -signal.SIGKILL and summary["status"] == "running"
        else:  # a clean stop: one line naming the run to resume, summary saved as interrupted
            name = signal.Signals(sig).name
            assert r.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143}[sig], r.stderr
            last = r.stderr.strip().splitlines()[-1]
            assert last.startswith(f"irnn: interrupted by {name} at step ") and f"--resume {run}" in last, last
            assert summary["status"] == "interrupted" and summary["reason"] == name
    # anywhere at all: during start-up, a step, an evaluation or a checkpoint write
    proc = subprocess.Popen(irnn_cmd("train", "--resume", str(run)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(rng.uniform(0.5, 4.0))
    proc.kill()
    resumed_from += [l for l in proc.communicate()[1].splitlines() if "resuming from step" in l]
    r = resume(run)
    assert r.returncode == 0, r.stderr
    resumed_from += [l for l in r.stderr.splitlines() if "resuming from step" in l]
    # the resumes really continued from checkpoints (restarting from 0 would also match the reference)
    steps = [int(l.split("resuming from step ")[1].split()[0]) for l in resumed_from]
    assert len(steps) >= 3 and all(0 < s < STEPS for s in steps[:3]), resumed_from
    assert "warning" not in r.stderr
    assert_same_run(run, reference)
    assert not list(run.rglob("*.tmp"))


# -- divergence guard --------------------------------------------------------------------------------
def test_guard_rolls_back_past_the_spike_and_recovers(spiked, reference):
    rows = [json.loads(l) for l in (spiked / "metrics.jsonl").read_text().splitlines()]
    events = [r for r in rows if r["kind"] == "event"]
    rollbacks = [e for e in events if e["event"] == "divergence"]
    skips = [e for e in events if e["event"] == "skip_batches"]
    assert len(rollbacks) >= 2 and len(skips) == len(rollbacks), events
    offset = 0
    for i, (e, skip) in enumerate(zip(rollbacks, skips), 1):
        assert e["action"] == "rollback" and e["retry"] == i
        assert e["rollback_to"] == 100 and e["step"] > 105  # no checkpoint while the spike was under watch
        assert e["new_lr"] == pytest.approx(1e-3 * 0.5 ** i)
        assert "stayed above" in e["reason"] or "non-finite" in e["reason"]
        # each retry skips every batch that its abandoned attempt drew
        assert (skip["step"], skip["first"], skip["last"], skip["count"]) == (
            e["step"], 100 + offset, e["step"] - 1 + offset, e["step"] - 100)
        offset += skip["count"]
    [recovered] = [e for e in events if e["event"] == "recovered"]
    assert recovered["retries"] == len(rollbacks) and recovered["step"] % 20 == 0  # at a checkpoint
    summary = json.loads((spiked / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == STEPS
    assert summary["guard_interventions"] == len(rollbacks) and summary["skipped_batches"] == offset
    assert summary["lr_final"] == pytest.approx(1e-3)  # back once it recovered
    # lines of the abandoned trajectories are gone: one train/eval line per step, in order
    assert_one_step_per_line(spiked)
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(10, STEPS + 1, 10))
    lowered = 1e-3 * 0.5 ** len(rollbacks)
    assert all(r["lr"] == pytest.approx(lowered) for r in train if 110 < r["step"] <= recovered["step"])
    assert all(r["lr"] == pytest.approx(1e-3) for r in train if r["step"] > recovered["step"])
    # identical to the reference up to the last checkpoint before the spike, recovered afterwards
    assert lines(spiked)[:12] == lines(reference)[:12]
    final = summary["final_test_mse"]
    assert final < summary["baseline_mse"], final


def test_kill_during_recovery_then_resume_is_exact(runs, spiked):
    run = runs / "spiked-killed"
    r = start_and_signal(runs, "spiked-killed", signal.SIGKILL, after_event=True, extra=tuple(SPIKE))
    assert r.returncode == -signal.SIGKILL and "Traceback" not in r.stderr
    r = resume(run)
    assert r.returncode == 0, r.stderr
    assert_same_run(run, spiked)


def test_non_finite_with_retries_exhausted_marks_the_run_diverged(runs, finished):
    r = finished["exhausted"]
    assert r.returncode == 1, r.stderr
    assert "status diverged" in r.stdout and "Traceback" not in r.stderr
    assert "guard: 2 rollbacks" in r.stdout
    run = runs / "exhausted"
    before = lines(run)
    events = [json.loads(l) for l in lines(run) if '"divergence"' in l]
    assert [e["action"] for e in events] == ["rollback", "rollback", "stop"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["guard_interventions"] == 2
    assert "gave up after 2 rollbacks in this incident" in summary["reason"] and "non-finite" in summary["reason"]
    assert summary["steps"] < STEPS
    # resuming a diverged run replays to the same end instead of pretending to finish
    again = in_process(irnn_train, resume=run, progress=False)
    assert again.summary["status"] == "diverged" and again.summary["steps"] == summary["steps"]
    assert lines(run) == before


def test_no_guard_records_the_raw_blow_up_and_stops(runs, finished, reference):
    r = finished["raw"]
    assert r.returncode == 1, r.stderr
    run = runs / "raw"
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    events = [r for r in rows if r["kind"] == "event"]
    assert len(events) == 1 and events[0]["action"] == "stop" and "guard off" in events[0]["reason"]
    assert "inf" in (events[0]["loss"], events[0]["grad_norm"]) or "nan" in (events[0]["loss"], events[0]["grad_norm"])
    assert events[0]["lr"] == pytest.approx(100.0)  # no lowered lr: nothing was rolled back
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "diverged" and "guard off" in summary["reason"]
    assert summary["steps"] == 105 and summary["lr_final"] == pytest.approx(1e-3)
    assert lines(run)[:-1] == lines(reference)[:len(lines(run)) - 1]


# -- checkpoints -----------------------------------------------------------------------------------
def _copy(run: Path, name: str) -> Path:
    dst = run.parent / name
    shutil.copytree(run, dst)
    return dst


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_keeps_last_k_and_best_and_no_temp_files(reference):
    names = sorted(p.name for p in (reference / "checkpoints").iterdir())
    assert names == ["best.pt"] + [f"ckpt-{s:09d}.pt" for s in (STEPS - 40, STEPS - 20, STEPS)]
    best = ckpt.load(reference / "checkpoints" / "best.pt")
    summary = json.loads((reference / "summary.json").read_text())
    assert best["step"] == summary["best_step"]
    assert best["loop"]["best"] == summary["best_test_mse"]
    assert best["config"]["hidden_size"] == 16 and best["versions"]["torch"]


def test_corrupt_newest_checkpoints_fall_back_to_an_older_good_one(reference):
    run = _copy(reference, "corrupt-newest")
    cdir = run / "checkpoints"
    newest = cdir / f"ckpt-{STEPS:09d}.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated
    _flip_byte(cdir / f"ckpt-{STEPS - 20:09d}.pt")  # bit rot
    # temporary files of atomic writes cut short by a kill
    leftovers = [cdir / f".ckpt-{STEPS:09d}.pt.x1y2.tmp", run / ".metrics.jsonl.a1b2.tmp", run / ".summary.json.q.tmp"]
    for p in leftovers:
        p.write_bytes(b"half")
    r = resume(run)
    assert r.returncode == 0, r.stderr
    warnings = [l for l in r.stderr.splitlines() if "warning" in l]
    assert len(warnings) == 2, r.stderr
    assert f"ckpt-{STEPS:09d}.pt" in warnings[0] and f"ckpt-{STEPS - 20:09d}.pt" in warnings[1]
    assert all("truncated or corrupted" in w for w in warnings)
    assert f"resuming from step {STEPS - 40}" in r.stderr and "Traceback" not in r.stderr
    assert_same_run(run, reference)
    assert not any(p.exists() for p in leftovers)
    assert sorted(p.name for p in cdir.glob("*.corrupt")) == [f"ckpt-{STEPS - 20:09d}.pt.corrupt",
                                                               f"ckpt-{STEPS:09d}.pt.corrupt"]


def test_all_checkpoints_corrupt_restarts_from_zero(reference):
    run = _copy(reference, "corrupt-all")
    for _, p in ckpt.list_checkpoints(RunDir(run)):
        _flip_byte(p)
    r = resume(run)
    assert r.returncode == 0, r.stderr
    assert "no usable checkpoint: starting again from step 0" in r.stderr and "Traceback" not in r.stderr
    assert_same_run(run, reference)
    # the fresh checkpoints were kept, not rotated out by the corrupt ones
    assert [s for s, _ in ckpt.list_checkpoints(RunDir(run))] == [STEPS - 40, STEPS - 20, STEPS]


def test_checkpoint_of_another_model_shape_is_one_line_exit_2(runs, reference):
    wide = in_process(irnn_train, Config(**{**json.loads((reference / "config.json").read_text())["config"],
                                "hidden_size": 24, "steps": 20, "threads": 0}), out_dir=runs / "wide", progress=False)
    assert wide.summary["status"] == "completed"
    run = _copy(reference, "foreign")
    shutil.copy(runs / "wide" / "checkpoints" / "ckpt-000000020.pt", run / "checkpoints" / "ckpt-000000999.pt")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    r = resume(run)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "hidden_size=24" in r.stderr and "hidden_size=16" in r.stderr
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_deleted_checkpoint_folder_and_cut_metrics_line_restart_cleanly(runs, reference):
    run = _copy(reference, "no-checkpoints")
    shutil.rmtree(run / "checkpoints")
    with open(run / "metrics.jsonl", "ab") as fh:
        fh.write(b'{"step": 310, "kind": "tra')  # a line cut short by a kill
    done = in_process(irnn_train, resume=run, progress=False)
    assert done.summary["status"] == "completed"
    assert_same_run(run, reference)


def test_atomic_write_leaves_old_file_or_new_file_never_a_mix(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"old")

    def boom(*a):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(path, b"new" * 1000)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_checkpoint_round_trip_and_every_damage_is_detected(reference):
    data = (reference / "checkpoints" / f"ckpt-{STEPS:09d}.pt").read_bytes()
    assert ckpt.decode(data)["step"] == STEPS
    rng = random.Random(0)
    for cut in (0, 7, 39, 40, len(data) // 2, len(data) - 1):
        with pytest.raises(ckpt.CheckpointError):
            ckpt.decode(data[:cut])
    for _ in range(20):
        damaged = bytearray(data)
        damaged[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        with pytest.raises(ckpt.CheckpointError):
            ckpt.decode(bytes(damaged))


def test_default_engine_also_resumes_exactly_through_a_rollback(runs):
    """engine=auto (the fused CPU engine where it is built): kill after the rollback, resume, compare."""
    from irnn.config import Config
    from irnn.engine import resolve_engine
    from irnn.models import build_model

    if resolve_engine("auto", build_model(Config(hidden_size=16), 2, 1), torch.device("cpu")) == "torch":
        pytest.skip("engine auto is the torch engine here (no fused CPU engine built)")
    args = [a if a != "torch" else "auto" for a in TINY] + SPIKE
    ref = subprocess.Popen(irnn_cmd("train", *args, "--out", str(runs), "--name", "auto-ref"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    r = start_and_signal(runs, "auto-killed", signal.SIGKILL, after_event=True, args=args)
    assert ref.wait(timeout=300) == 0, ref.stderr.read()
    r = resume(runs / "auto-killed")
    assert r.returncode == 0, r.stderr
    assert ckpt.load(runs / "auto-ref" / "checkpoints" / "best.pt")["engine"] == "fused"
    assert any('"event"' in l for l in lines(runs / "auto-ref"))
    assert_same_run(runs / "auto-killed", runs / "auto-ref")
