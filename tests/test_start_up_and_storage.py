"""Behaviour: a kill during start-up never leaves a folder that the next command refuses, and a disk
that fills up (or turns read-only, or refuses permission) ends in one line that says how to continue.

Real ``irnn`` subprocesses throughout. Kills land at seeded random moments (``random.Random(1234)``:
a failure replays); the storage errors come from a real full tmpfs where this machine lets the
test mount one, else from ``tests/faults/sitecustomize.py``, which makes the OS call fail in the
subprocess. Every interrupted run is finished with the command the error line names and must then
equal an uninterrupted run: ``metrics.jsonl`` minus wall-clock fields, final parameters and
optimiser state.
"""
from __future__ import annotations

import json
import os
import random
import shlex
import subprocess
import time
from pathlib import Path

import pytest

from irnn.cli import main
from irnn.config import ConfigError
from irnn.runs.store import RunDir
from test_robustness import assert_same_state, irnn_cmd, lines

STEPS = 60
TINY = ["--seq-len", "17", "--steps", str(STEPS), "--eval-every", "20", "--log-every", "10", "--batch-size", "8",
        "--train-size", "256", "--test-size", "32", "--hidden-size", "32", "--engine", "torch", "--threads", "1",
        "--quiet"]
SEEDS = ["--grid", "seed=0,1"]
FAULTS = Path(__file__).parent / "faults"


def run(argv: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    """``irnn ARGV`` in a subprocess; ``fault`` is an ``IRNN_TEST_FAULT`` (see tests/faults)."""
    env = dict(os.environ)
    if fault:
        env["IRNN_TEST_FAULT"] = fault
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(FAULTS), env.get("PYTHONPATH")) if p)
    return subprocess.run(irnn_cmd(*argv), capture_output=True, text=True, timeout=300, env=env)


def continue_with(stderr: str) -> list[str]:
    """The command that the last stderr line says continues the work, as argv after ``irnn``."""
    cmd = stderr.strip().splitlines()[-1].split("then continue with: ", 1)[1]
    words = shlex.split(cmd)
    assert words[0] == "irnn", cmd
    return words[1:]


def final_state(run_dir: Path) -> dict:
    from irnn.runs import checkpoint as ckpt

    return ckpt.load(run_dir / "checkpoints" / f"ckpt-{STEPS:09d}.pt")


def assert_same_run(got: Path, want: Path) -> None:
    assert lines(got) == lines(want)
    assert_same_state(final_state(got), final_state(want))
    summary = json.loads((got / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == STEPS


def members(sweep: Path) -> list[Path]:
    return sorted(p for p in (sweep / "members").iterdir() if not p.name.startswith("."))


def assert_only_resumable_runs(folder: Path) -> None:
    """What a kill may leave: hidden folders being built, and run folders that resume (config.json)."""
    if folder.is_dir():
        for p in folder.iterdir():
            assert p.name.startswith(".") or (p / "config.json").is_file(), f"{p} is half-made: {list(p.rglob('*'))}"


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    """The uninterrupted runs, started at once and waited for when first compared against."""
    root = tmp_path_factory.mktemp("refs")
    procs = {"train": subprocess.Popen(irnn_cmd("train", *TINY, "--out", str(root), "--name", "ref"),
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True),
             "sweep": subprocess.Popen(irnn_cmd("sweep", "--name", "ref-sweep", *SEEDS, *TINY, "--out", str(root)),
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)}
    paths = {"train": root / "ref", "sweep": root / "ref-sweep"}

    def wait(kind: str) -> Path:
        proc = procs[kind]
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
        return paths[kind]

    yield wait
    for proc in procs.values():
        proc.kill()
        proc.wait()


def kill_during_start_up(argv: list[str], watch: Path, rng: random.Random, *, building: bool) -> None:
    """Start ``irnn ARGV`` and SIGKILL it at a seeded moment of its start-up: a random time, or (``building``)
    a random instant soon after anything appears in ``watch``, where the run folder is being made."""
    def entries() -> set[str]:
        return {p.name for p in watch.iterdir()} if watch.is_dir() else set()

    before = entries()
    proc = subprocess.Popen(irnn_cmd(*argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    delay = rng.uniform(0.0, 0.1) if building else rng.uniform(0.1, 3.0)
    start = time.monotonic()
    while building and proc.poll() is None and time.monotonic() - start < 120:
        if entries() - before:
            break
        time.sleep(0.002)
    time.sleep(delay)
    proc.kill()
    proc.wait()


# -- item 2: kills during start-up -------------------------------------------------------------------------
def test_kill_during_start_up_then_the_same_command_finishes_exactly(tmp_path, refs):
    rng = random.Random(1234)
    out = tmp_path / "runs"
    cmd = ["train", *TINY, "--out", str(out), "--name", "K1"]
    run_dir = out / "K1"
    same_command_after_a_cut_start = 0
    for building in (True, False, True):
        if (run_dir / "config.json").is_file():  # a kill after the start: resuming is the way on
            kill_during_start_up(["train", "--resume", str(run_dir)], out, rng, building=False)
        else:
            kill_during_start_up(cmd, out, rng, building=building)
        assert_only_resumable_runs(out)
        same_command_after_a_cut_start += not (run_dir / "config.json").is_file() and any(out.glob(".K1.new.*"))
    started = (run_dir / "config.json").is_file()
    r = run(["train", "--resume", str(run_dir)] if started else cmd)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    # at least one kill hit the folder while it was being made (then the same command ran again)
    assert same_command_after_a_cut_start >= 1
    assert [p.name for p in out.iterdir()] == ["K1"]  # the leftovers were tidied up
    assert_same_run(run_dir, refs("train"))


def test_kill_during_sweep_start_up_then_the_same_command_finishes_exactly(tmp_path, refs):
    rng = random.Random(1234)
    out = tmp_path / "sweeps"
    cmd = ["sweep", "--name", "S", *SEEDS, *TINY, "--out", str(out)]
    cut_while_building = 0
    for building in (True, False):
        kill_during_start_up(cmd, out / "S" / "members", rng, building=building)
        assert_only_resumable_runs(out / "S" / "members")
        cut_while_building += any((out / "S" / "members").glob(".*.new.*"))
    assert cut_while_building >= 1  # a kill hit a member's folder while it was being made
    r = run(cmd)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    ref = refs("sweep")
    assert [p.name for p in members(out / "S")] == [p.name for p in members(ref)]
    assert not list((out / "S" / "members").glob(".*"))
    for got, want in zip(members(out / "S"), members(ref)):
        assert_same_run(got, want)


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_leftovers_are_reused_or_restored_and_real_results_never_deleted(tmp_path, capsys):
    """What older versions and kills at the worst moments leave, one case each (no training)."""
    from irnn.runs.store import _host

    host, dead = _host(), _dead_pid()
    # an older irnn's half-made folder: reused, and --resume says it is empty and how to start it
    (tmp_path / "old" / "checkpoints").mkdir(parents=True)
    assert main(["train", "--resume", str(tmp_path / "old")]) == 2
    err = capsys.readouterr().err
    assert "not an irnn run folder" in err and "empty" in err and "without --resume" in err
    building = tmp_path / f".old.new.{dead}@{host}.1a2b"
    (building / "checkpoints").mkdir(parents=True)
    (building / "config.json").write_text("{}")
    run = RunDir.create(tmp_path, "old")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "start-up was cut short" in err[0] and "reusing" in err[1], err
    assert not building.exists() and not (tmp_path / "old").exists() and run.path.name.startswith(".old.new.")
    (run.path / "config.json").write_text("{}")
    run.commit_create()
    assert run.path == tmp_path / "old" and (run.path / "config.json").is_file()
    # a folder with results but no config.json is refused, and kept
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ConfigError, match="not an irnn run"):
        RunDir.create(tmp_path, "odd")
    assert (tmp_path / "odd" / "metrics.jsonl").is_file()
    # --overwrite killed between setting the old run aside and moving the new one in: the old run comes back
    aside = tmp_path / f".kept.old.{dead}@{host}.3c4d"
    aside.mkdir()
    (aside / "config.json").write_text('{"old": 1}')
    with pytest.raises(ConfigError, match="already exists"):
        RunDir.create(tmp_path, "kept")
    assert "put back" in capsys.readouterr().err
    assert json.loads((tmp_path / "kept" / "config.json").read_text()) == {"old": 1}
    # a folder being built by a live process (here: our parent) is left alone
    live = tmp_path / f".kept.new.{os.getppid()}@{host}.5e6f"
    live.mkdir()
    RunDir.create(tmp_path, "kept", overwrite=True).undo_create()
    assert live.is_dir() and json.loads((tmp_path / "kept" / "config.json").read_text()) == {"old": 1}
    # --overwrite: the old run is replaced only once the new folder has its config, then deleted
    run = RunDir.create(tmp_path, "kept", overwrite=True)
    (run.path / "config.json").write_text('{"new": 1}')
    assert json.loads((tmp_path / "kept" / "config.json").read_text()) == {"old": 1}
    run.commit_create()
    assert json.loads((tmp_path / "kept" / "config.json").read_text()) == {"new": 1}
    assert sorted(p.name for p in tmp_path.glob(".kept.*")) == [live.name]
    # killed after the new run was in place but before the old one was deleted: the old one goes
    aside.mkdir()
    (aside / "config.json").write_text('{"old": 1}')
    RunDir.create(tmp_path, "kept", overwrite=True).undo_create()
    assert "removed" in capsys.readouterr().err and not aside.exists()
    assert json.loads((tmp_path / "kept" / "config.json").read_text()) == {"new": 1}


# -- item 3: a full disk, a read-only filesystem, no permission --------------------------------------------
def _mount_tmpfs(path: Path) -> bool:
    path.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(path)], capture_output=True,
                           timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0


def test_full_disk_mid_run_is_one_line_and_the_named_command_finishes_exactly(tmp_path, refs):
    fs = tmp_path / "fs"
    mounted = _mount_tmpfs(fs)
    try:
        ballast = fs / "ballast"
        fault = None
        if mounted:  # a real small filesystem, filled so that the run stops in its middle
            ref_bytes = sum(p.stat().st_size for p in refs("train").rglob("*") if p.is_file())
            st = os.statvfs(fs)
            ballast.write_bytes(b"\0" * (st.f_bavail * st.f_frsize - int(0.6 * ref_bytes)))
        else:  # no mounting here: the same error, injected where the disk would fill up
            fault = "ENOSPC:ckpt-000000040:open:1"
        run_dir = fs / "runs" / "x"
        r = run(["train", *TINY, "--out", str(fs / "runs"), "--name", "x"], fault)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        err = r.stderr.strip().splitlines()
        assert len(err) == 1, r.stderr
        assert err[0].startswith(f"irnn: cannot write {run_dir}/") and ": No space left on device; free space, " \
            f"then continue with: irnn train --resume {run_dir}" in err[0], err[0]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "failed" and 0 < summary["steps"] < STEPS, summary
        assert not list(fs.rglob("*.tmp")) and not list(fs.rglob(".*.tmp.*"))
        assert (run_dir / "metrics.jsonl").read_bytes().endswith(b"\n")
        ballast.unlink(missing_ok=True)
        r = run(continue_with(r.stderr))
        assert r.returncode == 0, r.stderr
        assert "resuming from step" in r.stderr and "warning" not in r.stderr
        assert_same_run(run_dir, refs("train"))
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(fs)], capture_output=True, timeout=30)


def test_disk_full_in_the_middle_of_a_metrics_line_leaves_whole_lines(tmp_path, refs):
    run_dir = tmp_path / "y"
    r = run(["train", *TINY, "--out", str(tmp_path), "--name", "y"], "ENOSPC:metrics.jsonl:write:4")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == (f"irnn: cannot write {run_dir}/metrics.jsonl: No space left on device; free space, "
                                f"then continue with: irnn train --resume {run_dir}")
    data = (run_dir / "metrics.jsonl").read_bytes()
    assert data.endswith(b"\n") and len(data.splitlines()) == 3  # the half line was cut off again
    assert all(json.loads(line) for line in data.splitlines())
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "failed"
    r = run(continue_with(r.stderr))
    assert r.returncode == 0, r.stderr
    assert_same_run(run_dir, refs("train"))


def test_read_only_and_permission_errors_in_a_sweep_are_one_line_and_the_same_command_continues(tmp_path, refs):
    out = tmp_path / "sweeps"
    cmd = ["sweep", "--name", "S", "--grid", "seed=0", *TINY, "--out", str(out), "--overwrite"]
    r = run(cmd, "EROFS:ckpt-000000040:open:1")  # the first member's checkpoint at step 40
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1, r.stderr
    first = members(out / "S")[0]
    assert err[0].startswith(f"irnn: cannot write {first}/checkpoints/ckpt-000000040.pt: Read-only file system; "
                             f"make that filesystem writable, then continue with: irnn sweep --name S "), err[0]
    again = continue_with(r.stderr)
    assert again == cmd[:-1]  # the same command, but never --overwrite (it would delete the progress)
    # all members train this time; then the results table cannot be written
    r = run(again, "EACCES:results.md:open:1")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"irnn: cannot write {out / 'S' / 'results.md'}: Permission denied; allow writing there, "
                           f"then continue with: irnn sweep --name S "), r.stderr
    r = run(continue_with(r.stderr))
    assert r.returncode == 0, r.stderr
    assert (out / "S" / "results.md").is_file()
    [got] = members(out / "S")
    assert_same_run(got, refs("sweep") / "members" / got.name)


def test_a_run_being_trained_is_neither_replaced_nor_resumed_by_another_process(tmp_path):
    """While one process trains a run, --overwrite and --resume of it from another are one line and exit 2
    and change nothing (an --overwrite used to replace it, and the first process then reported a run that
    was gone); once that process is killed, the run resumes."""
    args = ["train", *TINY, "--steps", "200000", "--out", str(tmp_path), "--name", "busy"]
    first = subprocess.Popen(irnn_cmd(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "busy"
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").is_file() or not (run_dir / "metrics.jsonl").read_text():
            assert first.poll() is None and time.monotonic() < deadline, "the first run did not start"
            time.sleep(0.2)
        config = (run_dir / "config.json").read_bytes()
        for argv in (["train", *TINY, "--out", str(tmp_path), "--name", "busy", "--overwrite"],
                     ["train", "--resume", str(run_dir)]):
            r = run(argv)
            assert r.returncode == 2 and r.stdout == "", (argv, r.stderr)
            assert len(r.stderr.splitlines()) == 1 and "being trained by another process" in r.stderr, r.stderr
            assert (run_dir / "config.json").read_bytes() == config
        assert first.poll() is None  # still training, in its own folder
        assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]
    finally:
        first.kill()
        first.wait(timeout=60)
    r = run(["train", "--resume", str(run_dir), "--steps", "120"])
    assert r.returncode == 0, r.stderr
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
