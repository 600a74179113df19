"""Behaviour: an IRNN really learns a short adding problem (the default engine, on the CPU)."""
import torch

import irnn


def test_irnn_solves_short_adding_problem(tmp_path):
    torch.set_num_threads(1)
    cfg = irnn.Config(seq_len=30, steps=8000, batch_size=32, lr=2e-3, optimizer="adam", clip_norm=1.0,
                      train_size=20_000, test_size=1000, eval_every=250, log_every=250, quiet=True, seed=0)
    run = irnn.train(cfg, out_dir=tmp_path / "learn")
    s = run.summary
    assert s["status"] == "completed"
    assert s["best_test_mse"] < 0.01, s  # the constant-prediction baseline is 0.167
    assert s["solved_step"] is not None and s["solved_step"] <= 8000
    steps, mse = run.curve("test_mse")
    assert mse[0] > 0.05  # it starts near the plateau, so the drop is learned, not given


def test_stop_when_solved_ends_a_run_early_and_stays_ended(tmp_path):
    from irnn.experiments.sweep import _state_of
    from irnn.runs.store import WALL_CLOCK_KEYS, iter_metrics

    torch.set_num_threads(1)
    base = dict(seq_len=30, steps=8000, batch_size=32, lr=2e-3, optimizer="adam", clip_norm=1.0, train_size=20_000,
                test_size=1000, eval_every=250, log_every=250, quiet=True, seed=0)
    run = irnn.train(irnn.Config(**base, stop_when_solved=3), out_dir=tmp_path / "stop")
    s = run.summary
    assert s["status"] == "completed" and "stopped_early" in s and _state_of(s) == "completed"
    # it ended at the first evaluation that made three in a row below 0.01 (a run can dip below once,
    # spike back above and solve again later, so read the streak off the run's own curve)
    steps, mse = run.curve("test_mse")
    below = [m < 0.01 for m in mse]
    third = next(i for i in range(2, len(below)) if all(below[i - 2:i + 1]))
    assert s["steps"] == steps[third] == steps[-1] < 8000, (s, list(zip(steps, mse)))
    assert s["solved_step"] == steps[below.index(True)] <= steps[third - 2]
    assert s["final_test_mse"] == mse[-1] < 0.01

    def numbers(path):
        return [{k: v for k, v in r.items() if k not in WALL_CLOCK_KEYS} for r in iter_metrics(path / "metrics.jsonl")]

    stopped = numbers(tmp_path / "stop")
    again = irnn.train(resume=tmp_path / "stop")  # nothing left to train
    assert again.summary["steps"] == s["steps"] and numbers(tmp_path / "stop") == stopped
    # the same run without the stop follows the same trajectory up to there
    full = irnn.train(irnn.Config(**{**base, "steps": s["steps"] + 250}), out_dir=tmp_path / "full")
    assert numbers(tmp_path / "full")[:len(stopped)] == stopped
    assert full.summary["steps"] == s["steps"] + 250


def test_irnn_train_is_callable_after_a_submodule_import():
    # importing a submodule binds irnn.train to the package; it must still train (a user's notebook
    # that imported irnn.train.guard first got "'module' object is not callable")
    import subprocess
    import sys

    code = ("import irnn, irnn.train.guard, sys; "
            "run = irnn.train(irnn.Config(seq_len=5, steps=4, eval_every=2, log_every=2, train_size=64, "
            "test_size=16, batch_size=8, quiet=True), out_dir=sys.argv[1]); print(run.summary['status'])")
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        out = subprocess.run([sys.executable, "-c", code, d + "/r"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "completed", out.stderr
