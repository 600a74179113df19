"""Sweeps: spec parsing and expansion, resume, failure isolation, locking, and two workers on one sweep."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import irnn
import irnn.experiments
from irnn.config import ConfigError
from irnn.experiments import MemberBusy, create, expand, load_spec, open_sweep, parse_spec, run_member, run_sweep, sweep
from irnn.experiments.sweep import FileLock, parse_grid_args
from irnn.runs.store import iter_metrics

TRAIN = importlib.import_module("irnn.train")  # the package (``irnn.train`` is also the function)
TINY = dict(seq_len=10, steps=30, eval_every=10, log_every=10, train_size=200, test_size=50, batch_size=8,
            hidden_size=8, engine="torch", threads=1, quiet=True)


# -- expansion ---------------------------------------------------------------------------------------
def test_grid_expands_to_named_members():
    spec = parse_spec({"name": "s", "base": {"steps": 10, "optimizer": "adam"},
                       "grid": {"seq_len": [50, 100], "model": ["irnn", "lstm"], "lr": [1e-3, 1e-4], "seed": [0, 1]}})
    members = expand(spec)
    assert len(members) == 16
    assert "irnn-50__adam__lr0.001__s0" in members and "lstm-100__adam__lr0.0001__s1" in members
    cfg = members["lstm-100__adam__lr0.0001__s1"]
    assert (cfg.model, cfg.seq_len, cfg.lr, cfg.seed, cfg.steps) == ("lstm", 100, 1e-4, 1, 10)


def test_joined_grids_name_only_their_own_axes():
    spec = parse_spec({"name": "p", "base": {"optimizer": "sgd"}, "grid": [
        {"model": ["irnn"], "clip_norm": [1, 10], "seed": [0]},
        {"model": ["lstm"], "clip_norm": [1, 10], "forget_bias": [1, 20], "seed": [0]}]})
    names = sorted(expand(spec))
    assert len(names) == 6
    assert "irnn-150__sgd__lr0.001__clip10__s0" in names  # no forget-bias part for the IRNN
    assert "lstm-150__sgd__lr0.001__clip1__fb20__s0" in names


def test_command_line_grid_equals_file(tmp_path):
    grid = parse_grid_args(["seq_len=50,100", "model=irnn,lstm", "init-scale=0.01,1"])
    from_cli = expand(parse_spec({"name": "s", "base": {"steps": "5"}, "grid": grid}))
    toml = tmp_path / "s.toml"
    toml.write_text('name = "s"\n[base]\nsteps = 5\n[grid]\nseq_len = [50, 100]\nmodel = ["irnn", "lstm"]\n'
                    'init_scale = [0.01, 1.0]\n')
    yaml = tmp_path / "s.yaml"
    yaml.write_text("name: s\nbase: {steps: 5}\ngrid:\n  seq_len: [50, 100]\n  model: [irnn, lstm]\n"
                    "  init_scale: [0.01, 1.0]\n")
    assert {n: c.to_dict() for n, c in from_cli.items()} == {n: c.to_dict() for n, c in expand(load_spec(toml)).items()}
    assert set(expand(load_spec(yaml))) == set(from_cli)


@pytest.mark.parametrize("data, message", [
    ({"name": "s", "grid": {"sequence_length": [1]}}, "unknown config key 'sequence_length'"),
    ({"name": "s", "grid": {"lr": 0.1}}, "must be a non-empty list"),
    ({"name": "s", "grid": {"lr": []}}, "must be a non-empty list"),
    ({"name": "s", "base": {"lr": 0.1}, "grid": {"lr": [0.1]}}, "set in both base and grid"),
    ({"name": "s", "grid": {"seed": [0, 0]}}, "lists 0 twice"),
    ({"name": "s", "grid": {"model": ["irnn", "transformer"]}}, "unknown model 'transformer'"),
    ({"name": "s", "grid": {"name": ["a"]}}, "set by the sweep"),
    ({"name": "../up", "grid": {"seed": [0]}}, "plain folder name"),
    ({"grid": {"seed": [0]}}, "plain folder name"),
    ({"name": "s", "grid": {"seed": [[0]]}}, "values must be numbers"),
    ({"name": "s", "gird": {"seed": [0]}}, "unknown sweep key 'gird'"),
    ({"name": "s", "grid": {"lr": [1e-3, 0.001]}}, "lists 0.001 twice"),
    ({"name": "s", "grid": {"lr": [1, 1.0]}}, "same member"),
])
def test_bad_specs_are_one_line_errors(data, message):
    with pytest.raises(ConfigError) as err:
        expand(parse_spec(data))
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("items", [["seq_len"], ["=1"], ["lr=1,,2"], ["lr="], ["lr=1", "lr=2"]])
def test_bad_grid_options(items):
    with pytest.raises(ConfigError):
        parse_grid_args(items)


_KEYS = st.sampled_from(["seq_len", "model", "lr", "seed", "clip_norm", "init_scale", "optimizer", "name", "out",
                         "bogus", "steps", "stream", "preset", "epochs", "device", ""])
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**30), st.floats(allow_nan=True, allow_infinity=True),
                     st.text(max_size=8), st.sampled_from(["irnn", "lstm", "adam", "sgd", "1e-3", "150", "quick"]))
_VALUES = st.recursive(_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                          st.dictionaries(_KEYS, inner, max_size=3)), max_leaves=8)
_TABLE = st.dictionaries(_KEYS, st.one_of(st.lists(_VALUES, max_size=3), _VALUES), max_size=4)
_SPEC = st.fixed_dictionaries({}, optional={"name": st.one_of(st.sampled_from(["s", "a.b", ""]), _SCALARS),
                                            "base": st.one_of(_TABLE, _VALUES), "grid": st.one_of(_TABLE, st.lists(_TABLE, max_size=3), _VALUES),
                                            "description": _VALUES, "extra": _VALUES})


def _accepted_or_one_line_error(read_spec):
    """A spec either expands into Configs or is refused with a one-line ConfigError."""
    try:
        members = expand(read_spec())
    except ConfigError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert all(isinstance(c, irnn.Config) for c in members.values())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_SPEC)
def test_any_spec_table_is_accepted_or_a_config_error(data):
    _accepted_or_one_line_error(lambda: parse_spec(data))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(text=st.one_of(st.text(max_size=80), st.sampled_from([
    'name = "s"\n[grid]\nseed = [0, 1]\n', "name: s\ngrid: {seed: [0, 1]}\n", "name: s\ngrid: [[1]]\n",
    'name = "s"\n[[grid]]\nlr = [1e400]\n', "name: s\ngrid:\n  lr: [1" + "0" * 400 + "]\n", "- 1\n- 2\n",
    "name: s\nbase: !!python/object:os.system x\n", "name: s\ngrid: {seq_len: [2020-01-01]}\n"])),
       ext=st.sampled_from([".toml", ".yaml"]))
def test_any_sweep_file_is_accepted_or_a_config_error(tmp_path, text, ext):
    path = tmp_path / f"sweep{ext}"
    path.write_text(text, encoding="utf-8")
    _accepted_or_one_line_error(lambda: load_spec(path))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=_SPEC)
def test_any_yaml_sweep_file_is_accepted_or_a_config_error(tmp_path, data):
    import yaml

    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    _accepted_or_one_line_error(lambda: load_spec(path))


# -- running -----------------------------------------------------------------------------------------
@pytest.fixture
def count_training(monkeypatch):
    """Count the members each train_many call gets (the sweep's only way to train)."""
    calls: list[list[str]] = []
    real = TRAIN.train_many

    def counting(cfgs, out_dirs, **kw):
        calls.append([Path(o).name for o in out_dirs])
        return real(cfgs, out_dirs, **kw)

    monkeypatch.setattr(TRAIN, "train_many", counting)
    return calls


def _snapshot(sweep_dir: Path) -> dict[str, tuple[int, bytes]]:
    return {p.parent.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(sweep_dir.glob("members/*/metrics.jsonl"))}


def test_sweep_resumes_and_skips_finished(tmp_path, count_training):
    grid = {"model": ["irnn", "rnn-tanh"], "seed": [0, 1]}
    table = sweep(grid, name="r", base=TINY, out=tmp_path)
    assert len(table) == 2 and [r["seeds"] for r in table] == [2, 2]
    sw = open_sweep(tmp_path / "r")
    assert sorted(n for call in count_training for n in call) == sorted(sw.names)
    assert all(len(call) == 2 for call in count_training)  # seeds of one setting go to train_many together
    assert {e["state"] for e in sw.read_index().values()} == {"completed"}
    before = _snapshot(sw.path)

    # Nothing is trained again.
    count_training.clear()
    table2 = sweep(grid, name="r", base=TINY, out=tmp_path)
    assert count_training == [] and _snapshot(sw.path) == before
    assert table2.rows == table.rows

    # A worker died mid-sweep: its member's summary is gone and the index still says "running".
    victim = sw.names[1]
    (sw.member_dir(victim) / "summary.json").unlink()
    sw.update_index({victim: {"state": "running", "pid": 1}})
    assert run_member(sw.path, sw.names[0])["status"] == "completed" and count_training == []
    sweep(grid, name="r", base=TINY, out=tmp_path)
    assert count_training == [[victim]]
    assert sw.read_index()[victim]["state"] == "completed"
    steps = [(r["step"], r["kind"]) for r in iter_metrics(sw.member_dir(victim) / "metrics.jsonl")]
    assert len(steps) == len(set(steps)) and max(s for s, _ in steps) == TINY["steps"]


def test_a_failed_member_does_not_stop_the_others(tmp_path, monkeypatch):
    real = TRAIN.train_many
    def flaky(cfgs, out_dirs, **kw):
        for c, o in zip(cfgs, out_dirs):
            if c.seed == 1 and c.model == "irnn":
                raise RuntimeError("injected fault\nsecond line")
            real([c], [o], **kw)

    monkeypatch.setattr(TRAIN, "train_many", flaky)
    table = sweep({"model": ["irnn", "rnn-relu"], "seed": [0, 1, 2]}, name="f", base=TINY, out=tmp_path)
    sw = open_sweep(tmp_path / "f")
    index = sw.read_index()
    bad = "irnn-10__adam__lr0.001__s1"
    assert index[bad]["state"] == "failed" and index[bad]["error"] == "RuntimeError: injected fault"
    assert all(e["state"] == "completed" for n, e in index.items() if n != bad)
    irnn_row = next(r for r in table if r["model"] == "irnn")
    assert irnn_row["failed"] == 1 and irnn_row["finished"] == 2
    assert run_member(sw.path, bad)["status"] == "failed"

    # A re-run tries the failed member again (and only it); now it succeeds.
    seen = []
    monkeypatch.setattr(TRAIN, "train_many", lambda c, o, **kw: (seen.extend(Path(x).name for x in o), real(c, o, **kw))[1])
    sweep({"model": ["irnn", "rnn-relu"], "seed": [0, 1, 2]}, name="f", base=TINY, out=tmp_path)
    assert seen == [bad] and sw.read_index()[bad]["state"] == "completed"


def test_a_diverged_member_is_recorded_and_not_retried(tmp_path, count_training):
    # an infinite loss at batch 5 and no rollback allowed: nothing to continue from
    base = {**TINY, "inject_spike": "5:1e30", "guard_retries": 0}
    sweep({"seed": [0]}, name="d", base=base, out=tmp_path)
    sw = open_sweep(tmp_path / "d")
    (name,) = sw.names
    assert sw.read_index()[name]["state"] == "diverged"
    count_training.clear()
    sweep({"seed": [0]}, name="d", base=base, out=tmp_path)
    assert count_training == []


def test_member_locks_and_spec_changes(tmp_path):
    spec = parse_spec({"name": "l", "base": TINY, "grid": {"seed": [0, 1]}})
    sw = create(spec, tmp_path)
    name = sw.names[0]
    lock = FileLock(sw.path / "locks" / f"{name}.lock")
    assert lock.acquire(blocking=False)
    try:
        with pytest.raises(MemberBusy):
            run_member(sw.path, name)
        with pytest.raises(ConfigError, match="being trained by another process"):
            create(parse_spec({"name": "l", "base": TINY, "grid": {"seed": [0, 2]}}), tmp_path, overwrite=True)
    finally:
        lock.release()
    # the same spec (in another order, with other env keys) opens the same sweep
    again = create(parse_spec({"name": "l", "base": {**TINY, "quiet": False}, "grid": {"seed": [1, 0]}}), tmp_path)
    assert set(again.names) == set(sw.names)
    with pytest.raises(ConfigError, match="holds a different sweep.*--overwrite"):
        create(parse_spec({"name": "l", "base": {**TINY, "steps": 31}, "grid": {"seed": [0, 1]}}), tmp_path)
    new = create(parse_spec({"name": "l", "base": {**TINY, "steps": 31}, "grid": {"seed": [0, 1]}}), tmp_path,
                 overwrite=True)
    assert new.config(name).steps == 31
    with pytest.raises(ConfigError, match="no member"):
        run_member(sw.path, "nope")


def test_ray_backend_is_called_with_the_unfinished_members(tmp_path, monkeypatch):
    import types

    got = {}

    def run_members(sweep_dir, names, *, address=None, **kw):
        got.update(sweep_dir=Path(sweep_dir), names=list(names), address=address)
        return {n: run_member(sweep_dir, n) for n in names}

    fake = types.SimpleNamespace(run_members=run_members)
    monkeypatch.setitem(sys.modules, "irnn.experiments.ray_backend", fake)
    monkeypatch.setattr(irnn.experiments, "ray_backend", fake, raising=False)
    sw = create(parse_spec({"name": "ray", "base": TINY, "grid": {"seed": [0, 1]}}), tmp_path)
    table = run_sweep(sw, backend="ray", address="auto")
    assert got == {"sweep_dir": sw.path, "names": sw.names, "address": "auto"}
    assert table[0]["finished"] == 2

    monkeypatch.setitem(sys.modules, "irnn.experiments.ray_backend", None)  # the module is missing
    monkeypatch.delattr("irnn.experiments.ray_backend", raising=False)
    with pytest.raises(ConfigError, match="ray backend is not available"):
        run_sweep(create(parse_spec({"name": "ray2", "base": TINY, "grid": {"seed": [0]}}), tmp_path), backend="ray")


# -- the command line: two workers on one sweep --------------------------------------------------------
def _irnn(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "irnn.cli", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_two_processes_share_one_sweep(tmp_path):
    args = ["sweep", "--name", "two", "--out", str(tmp_path), "--grid", "seq_len=10,12", "--grid", "seed=0,1",
            "--steps", "30", "--eval-every", "10", "--log-every", "10", "--train-size", "200", "--test-size", "50",
            "--batch-size", "8", "--hidden-size", "8", "--engine", "torch", "--threads", "1"]
    procs = [_irnn(*args, cwd=tmp_path) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    sw = open_sweep(tmp_path / "two")
    assert len(sw.names) == 4
    assert {e["state"] for e in sw.read_index().values()} == {"completed"}
    trained_by = Counter()
    for out, _ in outs:
        for line in out.splitlines():
            if line.startswith("[") and "completed" in line:
                trained_by[line.split()[2]] += 1
    assert sorted(trained_by) == sorted(sw.names) and set(trained_by.values()) == {1}, outs  # each member once
    for n in sw.names:
        rows = [(r["step"], r["kind"]) for r in iter_metrics(sw.member_dir(n) / "metrics.jsonl")]
        assert len(rows) == len(set(rows)) and rows[-1][0] == 30, (n, rows)
    for out, _ in outs:
        assert "| 12 | IRNN |" in out  # both print the full table at the end

    # Same name, different spec: one line, exit 2, nothing touched.
    before = _snapshot(sw.path)
    p = _irnn(*args[:-2], "--threads", "1", "--lr", "0.01", cwd=tmp_path)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2 and err.strip().count("\n") == 0 and "different sweep" in err
    assert _snapshot(sw.path) == before
