"""The Ray backend for real: a local Ray with 2 CPUs runs a 4-member sweep as Ray Tune trials.

Its aggregated table (and every member's metrics) must equal the local backend's for the
same seeds: the trials call the same trainer, and on the CPU the numbers are deterministic.
The worker training one member is killed mid-run, so Ray's retry (and the run's exact
resume) is exercised too, and a second call must train nothing.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import pytest

import irnn
from irnn.runs.store import WALL_CLOCK_KEYS, iter_metrics

BASE = dict(steps=100, eval_every=50, log_every=50, train_size=500, test_size=100, batch_size=16,
            engine="torch", threads=1, quiet=True)
GRID = {"seq_len": [10, 20], "seed": [0, 1]}


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_AUTH_MODE", "disabled")  # a private test cluster needs no token
    mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning", log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        mp.undo()


def _deterministic(rows):
    return [{k: v for k, v in r.items() if not k.startswith("wall_time")} for r in rows]


def _metrics(run_dir):
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK_KEYS} for r in iter_metrics(run_dir / "metrics.jsonl")]


def _attempts(sweep_dir):
    path = sweep_dir / "ray" / "attempts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_ray_sweep_equals_local_sweep(tmp_path, local_ray):
    from irnn.experiments import create, parse_spec, run_sweep, sweep
    from irnn.experiments.ray_backend import run_members

    t0 = time.perf_counter()
    local = sweep(GRID, name="tiny", base=BASE, out=tmp_path / "local")
    t_local = time.perf_counter() - t0

    sw = create(parse_spec({"name": "tiny", "base": BASE, "grid": GRID}), tmp_path / "ray")
    assert len(sw.names) == 4
    # A worker crash: the process training the victim is killed (SIGKILL) as soon as it starts on it.
    victim, killed = sw.names[1], []
    done = threading.Event()

    def crash_victim():
        while not done.is_set():
            entry = sw.read_index()[victim]
            if entry.get("state") == "running" and entry.get("pid") not in (None, os.getpid()):
                os.kill(entry["pid"], signal.SIGKILL)
                killed.append(entry["pid"])
                return
            time.sleep(0.01)

    watcher = threading.Thread(target=crash_victim, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    try:
        table = run_sweep(sw, backend="ray")
    finally:
        done.set()
        watcher.join(5)
    t_ray = time.perf_counter() - t0

    # Every member finished, the victim after Ray retried its trial (and resumed its run).
    assert killed, "the victim finished before it could be killed"
    assert {n: sw.read_index()[n]["state"] for n in sw.names} == {n: "completed" for n in sw.names}
    tries = {n: sum(n in a["names"] for a in _attempts(sw.path)) for n in sw.names}
    assert 2 <= tries[victim] <= 3 and all(tries[n] == 1 for n in sw.names if n != victim), tries

    # The same table as the local backend, and the same numbers in every member's metrics.
    assert len(table) == 2
    assert _deterministic(table.rows) == _deterministic(local.rows)
    assert (sw.path / "results.md").is_file() and (sw.path / "results.csv").is_file()
    for n in sw.names:
        assert _metrics(sw.member_dir(n)) == _metrics(tmp_path / "local" / "tiny" / "members" / n), n

    # Running again trains nothing: `irnn sweep --backend ray` starts no trial for finished members, and
    # trials given finished members (run_members called directly) only read them.
    before = {n: (sw.member_dir(n) / "metrics.jsonl").read_bytes() for n in sw.names}
    stamps = {n: os.stat(sw.member_dir(n) / "summary.json").st_mtime_ns for n in sw.names}
    again = run_sweep(sw, backend="ray")
    assert _deterministic(again.rows) == _deterministic(table.rows)
    assert len(_attempts(sw.path)) == sum(tries.values())
    t0 = time.perf_counter()
    summaries = run_members(sw.path, sw.names[:2])
    t_rerun = time.perf_counter() - t0
    assert set(summaries) == set(sw.names[:2]) and all(s["status"] == "completed" for s in summaries.values())
    assert len(_attempts(sw.path)) == sum(tries.values()) + 2
    assert {n: (sw.member_dir(n) / "metrics.jsonl").read_bytes() for n in sw.names} == before
    assert {n: os.stat(sw.member_dir(n) / "summary.json").st_mtime_ns for n in sw.names} == stamps
    print(f"local {t_local:.1f} s, ray {t_ray:.1f} s, ray re-run {t_rerun:.1f} s")


def test_missing_ray_is_one_line(tmp_path, monkeypatch, capsys):
    from irnn.cli import main
    from irnn.experiments import create, parse_spec
    from irnn.experiments.ray_backend import INSTALL_HINT, run_members

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    sw = create(parse_spec({"name": "tiny", "base": BASE, "grid": {"seed": [0, 1]}}), tmp_path)
    with pytest.raises(irnn.ConfigError) as err:
        run_members(sw.path, sw.names)
    assert str(err.value) == INSTALL_HINT == '--backend ray needs ray: pip install "irnn[ray]"'

    code = main(["sweep", "--name", "cli", "--grid", "seed=0,1", "--steps", "10", "--out", str(tmp_path),
                 "--backend", "ray"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and lines == [f"irnn: error: {INSTALL_HINT}"]
    assert not any((tmp_path / "cli" / "members").glob("*/metrics.jsonl"))  # nothing trained


def test_members_equal_across_backends_workers_threads_and_stacking(tmp_path, local_ray):
    # The fused engine (stacked ensembles locally, members alone in Ray trials) under unequal thread counts:
    # torch's 2 locally, 1 in each Ray trial (Ray sets OMP_NUM_THREADS=1), 3 for a plain run of one member.
    import torch

    from irnn.experiments import create, parse_spec, run_sweep, sweep

    base = dict(seq_len=17, steps=80, eval_every=40, log_every=40, batch_size=8, train_size=512, test_size=64,
                quiet=True)
    grid = {"seed": [4, 5], "model": ["irnn", "rnn-tanh"]}
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        sweep(grid, name="loc", base=base, out=tmp_path)
        sw = create(parse_spec({"name": "w2", "base": base, "grid": grid}), tmp_path)
        run_sweep(sw, workers=2)
    finally:
        torch.set_num_threads(before)
    ray_sw = create(parse_spec({"name": "ray", "base": base, "grid": grid}), tmp_path)
    run_sweep(ray_sw, backend="ray")
    loc = tmp_path / "loc" / "members"
    names = sorted(p.name for p in loc.iterdir())
    assert len(names) == 4
    engines, threads = set(), set()
    for sweep_name in ("w2", "ray"):
        for n in names:
            run = tmp_path / sweep_name / "members" / n
            assert _metrics(run) == _metrics(loc / n), (sweep_name, n)
            engines.add(json.loads((run / "summary.json").read_text())["engine"])
            threads.add(json.loads((run / "config.json").read_text())["threads"])
            assert json.loads((run / "config.json").read_text())["numerics"]["thread_count_independent"]
    engines.update(json.loads((loc / n / "summary.json").read_text())["engine"] for n in names)
    threads.update(json.loads((loc / n / "config.json").read_text())["threads"] for n in names)
    member = json.loads((loc / names[0] / "config.json").read_text())["config"]
    from irnn.train import train

    alone = train(out_dir=tmp_path / "alone", **{**member, "threads": 3})
    assert _metrics(alone.path) == _metrics(loc / names[0])
    assert "ensemble-fused" in engines and "fused" in engines and {1, 2} <= threads, (engines, threads)
