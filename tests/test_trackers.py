"""Trackers through the real packages: an offline W&B run and TensorBoard event files, read back.

W&B runs in ``WANDB_MODE=offline`` with every W&B folder inside the test's tmp
dir; nothing touches the network. The offline ``.wandb`` file is read back
record by record (its framing is LevelDB's log format, its records W&B's own
protobufs), so the test sees exactly what ``wandb sync`` would upload.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import irnn
from irnn.runs.store import iter_metrics

TINY = dict(seq_len=10, steps=100, eval_every=50, log_every=25, batch_size=16, train_size=500, test_size=100,
            engine="torch", threads=1)
TINY_ARGS = ["--seq-len", "10", "--steps", "100", "--eval-every", "50", "--log-every", "25", "--batch-size", "16",
             "--train-size", "500", "--test-size", "100", "--engine", "torch", "--threads", "1"]


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """Offline, silent W&B whose caches and settings live in tmp (never in ~ or the repo)."""
    pytest.importorskip("wandb")
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
           "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"), "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
           "WANDB_DATA_DIR": str(tmp_path / "wandb-data"), "WANDB_ARTIFACT_DIR": str(tmp_path / "wandb-artifacts")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("WANDB_DIR", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_RUN_GROUP", "WANDB_NAME"):
        monkeypatch.delenv(k, raising=False)
    return env


# -- reading an offline W&B run --------------------------------------------------------
def read_wandb_records(path: Path) -> list:
    """Every record of a ``run-<id>.wandb`` file.

    The file is a 7-byte header (``:W&B``, magic 0xBEE1, version 0) followed by
    LevelDB-log framing: 32 KiB blocks of chunks ``crc32 u32 | length u16 |
    type u8 | payload`` (type 1 full, 2 first, 3 middle, 4 last); a record is a
    serialised ``wandb_internal_pb2.Record``.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, block, records, buf = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        buf = payload if kind in (1, 2) else buf + payload
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            records.append(rec)
            buf = b""
    return records


def offline_run(run_path: Path) -> dict:
    """The run, config, history rows and summary of the offline W&B run(s) in a run folder."""
    files = sorted((run_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert files, f"no offline W&B run under {run_path / 'wandb'}: {sorted(map(str, run_path.rglob('*')))}"
    out = {"files": files, "runs": [], "history": [], "summary": {}, "config": {}}
    for f in files:
        for rec in read_wandb_records(f):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                out["runs"].append(rec.run)
                out["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
            elif kind == "config":
                out["config"].update({i.key: json.loads(i.value_json) for i in rec.config.update})
            elif kind == "history":
                out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                       for i in rec.history.item})
            elif kind == "summary":
                out["summary"].update({i.key: json.loads(i.value_json) for i in rec.summary.update if i.key})
    return out


def _metric_rows(run_path: Path) -> list[dict]:
    return [r for r in iter_metrics(run_path / "metrics.jsonl") if r["kind"] in ("train", "eval")]


def _assert_history_matches(history: list[dict], run_path: Path) -> None:
    """Every metrics.jsonl line is a W&B history row with the same step, names and values."""
    rows = _metric_rows(run_path)
    assert len(rows) >= 6
    for row in rows:
        want = {k: v for k, v in row.items() if k not in ("kind",)}
        assert any(set(want) <= set(h) and all(h[k] == pytest.approx(v, rel=1e-12) for k, v in want.items())
                   for h in history), f"metrics line {row} is not in the W&B history"


# -- the command line, both trackers at once ---------------------------------------------
def test_cli_tracks_wandb_and_tensorboard(tmp_path, wandb_env):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "runs"
    proc = subprocess.run([sys.executable, "-m", "irnn.cli", "train", *TINY_ARGS, "--track", "wandb,tensorboard",
                           "--out", str(out), "--quiet"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **wandb_env}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (run_path,) = list(out.iterdir())
    # The local run store is written as always.
    summary = json.loads((run_path / "summary.json").read_text())
    assert summary["status"] == "completed" and (run_path / "config.json").is_file()
    assert run_path.name.startswith("irnn-10__adam__s0__")

    wb = offline_run(run_path)
    (run,) = wb["runs"]
    assert run.display_name == run_path.name  # irnn-10__adam__s0__<time>: the prototype's irnn-<T> first
    assert run.project == "irnn" and "irnn-10" in list(run.tags)
    assert wb["config"]["seq_len"] == 10 and wb["config"]["model"] == "irnn" and wb["config"]["steps"] == 100
    _assert_history_matches(wb["history"], run_path)
    assert wb["summary"]["final_test_mse"] == pytest.approx(summary["final_test_mse"], rel=1e-12)
    assert wb["summary"]["status"] == "completed"

    # TensorBoard: the same names and the same values (stored as float32).
    acc = EventAccumulator(str(run_path / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    rows = _metric_rows(run_path)
    names = {k for r in rows for k in r if k not in ("step", "kind")}
    assert set(acc.Tags()["scalars"]) == names
    for name in names:
        want = [(r["step"], r[name]) for r in rows if name in r]
        got = [(e.step, e.value) for e in acc.Scalars(name)]
        assert [s for s, _ in got] == [s for s, _ in want], name
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), name
    assert "config/text_summary" in acc.Tags()["tensors"]  # add_text stores text as a tensor summary

    # The run's figures (those of `irnn plot RUN`, drawn by irnn.results.figures) reach both trackers.
    pngs = sorted(p.stem for p in (run_path / "figures").glob("*.png"))
    assert pngs, "no figures drawn at the end of the run"
    assert {f"figures/{s}" for s in pngs} <= set(acc.Tags()["images"])
    assert all(any(f"figures/{s}/_type" in h for h in wb["history"]) for s in pngs)


# -- the Python API: a sweep's group, resume, divergence events, figures ------------------
def test_wandb_group_resume_and_events(tmp_path, wandb_env, monkeypatch):
    # A stand-in for irnn.results.figures.run_figures: whatever it draws is what the trackers log.
    drawn = []

    def run_figures(member, out_dir):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps, mse = irnn.Run(Path(member.path), None, {}).curve("test_mse")
        fig, ax = plt.subplots(figsize=(2, 2))
        ax.plot(steps, mse)
        Path(out_dir).mkdir(exist_ok=True)
        path = Path(out_dir) / "curves.png"
        fig.savefig(path)
        plt.close(fig)
        drawn.append(path)
        return [path]

    import irnn.results.figures

    monkeypatch.setattr(irnn.results.figures, "run_figures", run_figures)

    run_path = tmp_path / "sweep" / "irnn-10__s0"
    # A learning-rate spike makes the guard roll back: its event must not pollute the training curves.
    cfg = irnn.Config(**TINY, track="wandb,tensorboard", quiet=True, inject_lr_spike="30:35:1000", guard_factor=3.0,
                      guard_lr_decay=0.001)
    run = irnn.train(cfg, out_dir=run_path, group="sweep-adding")
    assert run.summary["status"] == "completed"
    first = offline_run(run_path)
    (r1,) = first["runs"]
    assert r1.run_group == "sweep-adding" and r1.display_name == "irnn-10__s0"
    _assert_history_matches(first["history"], run_path)
    events = [r for r in iter_metrics(run_path / "metrics.jsonl") if r["kind"] == "event"]
    assert [(e["event"], e.get("action")) for e in events] == [("divergence", "rollback"), ("skip_batches", None)]
    assert [h["divergence/new_lr"] for h in first["history"] if "divergence/new_lr" in h] == [events[0]["new_lr"]]
    assert [h["skip_batches/count"] for h in first["history"] if "skip_batches/count" in h] == [events[1]["count"]]
    assert all("loss" not in h for h in first["history"])  # the event's loss stays apart from train_loss
    assert drawn and any("figures/curves/_type" in h for h in first["history"])  # a wandb.Image row
    assert list(run_path.glob("wandb/offline-run-*/files/media/images/figures/curves*.png"))

    # Resuming with more steps continues the same W&B run (same id, so `wandb sync` merges them).
    run2 = irnn.train(resume=run_path, steps=150, quiet=True, group="sweep-adding")
    assert run2.summary["steps"] == 150
    both = offline_run(run_path)
    assert len(both["runs"]) == 2 and both["runs"][0].run_id == both["runs"][1].run_id
    assert max(h.get("step", 0) for h in both["history"]) == 150
    _assert_history_matches(both["history"], run_path)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_path / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    assert "figures/curves" in acc.Tags()["images"]


# -- missing extras: one line, what to install, nothing left behind ------------------------
@pytest.mark.parametrize("tracker, module", [("wandb", "wandb"), ("tensorboard", "tensorboard")])
def test_missing_extra_is_one_line(tmp_path, monkeypatch, capsys, tracker, module):
    from irnn.cli import main

    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    for name in [m for m in sys.modules if m == "torch.utils.tensorboard" or m.startswith("torch.utils.tensorboard.")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(irnn.ConfigError, match=rf'pip install "irnn\[{tracker}\]"'):
        irnn.train(irnn.Config(**TINY, track=tracker, quiet=True), out_dir=tmp_path / "api")
    assert not (tmp_path / "api").exists()  # nothing trained, no folder left to block the name

    code = main(["train", *TINY_ARGS, "--track", tracker, "--out", str(tmp_path / "cli"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == f'irnn: error: --track {tracker} needs the {module} package: pip install "irnn[{tracker}]"'
    assert not (tmp_path / "cli").exists() or not any((tmp_path / "cli").iterdir())


# -- progress ---------------------------------------------------------------------------
def test_progress_bar_and_quiet(tmp_path):
    args = [sys.executable, "-m", "irnn.cli", "train", *TINY_ARGS, "--out", str(tmp_path)]
    loud = subprocess.run(args + ["--name", "loud"], capture_output=True, text=True, timeout=300)
    assert loud.returncode == 0, loud.stderr
    # tqdm's bar: done/total, elapsed<remaining (the ETA), rate, and the loss in the postfix.
    assert "100/100" in loud.stderr and "<00:00" in loud.stderr and "step/s" in loud.stderr
    assert "loss=" in loud.stderr and "test_mse=" in loud.stderr
    quiet = subprocess.run(args + ["--name", "quiet", "--quiet"], capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0 and quiet.stderr == ""
    assert "run stored in" in quiet.stdout
