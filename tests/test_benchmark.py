"""``irnn benchmark``: its sweep, its leaderboard against the runs it ranks, its report and its bad input."""
from __future__ import annotations

import csv
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from irnn.config import ConfigError
from irnn.experiments.benchmark import MODELS, benchmark, benchmark_spec, leaderboard, overall
from irnn.results.aggregate import MODEL_NAMES, best_settings, collect, settings
from irnn.runs.store import read_json


def test_quick_spec_gives_every_model_the_same_budget_on_each_task():
    spec, meta = benchmark_spec("quick")
    assert set(meta["tasks"]) == {"adding", "copy", "mnist"} and tuple(meta["models"]) == MODELS
    by_task: dict[str, set] = {}
    for t in spec.grid:
        same = tuple((k, tuple(v)) for k, v in sorted(t.items()) if k != "model")
        by_task.setdefault(t["task"][0], set()).add(same)
    assert all(len(v) == 1 for v in by_task.values()), by_task  # only the model differs within a task
    assert spec.base["guard"] is True
    assert len(spec.grid) == len(MODELS) * 3


def test_bad_choices_are_config_errors():
    with pytest.raises(ConfigError, match="--models"):
        benchmark_spec("quick", models=["irnn", "nope"])
    with pytest.raises(ConfigError, match="--tasks"):
        benchmark_spec("quick", tasks=["pmnist"])  # quick has no permuted MNIST
    with pytest.raises(ConfigError, match="--data-dir"):
        benchmark_spec("full")
    with pytest.raises(ConfigError, match="unknown budget"):
        benchmark_spec("huge")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    report = benchmark("quick", out=out, models=["irnn", "indrnn", "rnn-tanh"], tasks=["adding", "copy"],
                       seeds=2, steps=60, workers=1, env={"threads": 1})
    return report


def test_leaderboard_rows_are_the_runs_summaries(small: Path):
    sweep = small.parent
    rows = list(csv.DictReader((sweep / "leaderboard.csv").open()))
    assert len(rows) == 6 and {r["task"] for r in rows} == {"adding-100", "copy-70"}
    for r in rows:
        runs = [p for p in (sweep / "members").iterdir()
                if read_json(p / "config.json")["config"]["model"] == r["model"]
                and read_json(p / "config.json")["config"]["task"] == r["task"].split("-")[0]]
        assert len(runs) == 2
        sums = [read_json(p / "summary.json") for p in runs]
        metric = sums[0]["primary_metric"]
        assert float(r["final_mean"]) == pytest.approx(statistics.mean(s[f"final_{metric}"] for s in sums), rel=1e-9)
        ms = statistics.median(s["wall_time_s"] / s["steps"] * 1e3 for s in sums)
        assert float(r["ms_per_step"]) == pytest.approx(ms, rel=1e-9)
        assert int(r["guard_rollbacks"]) == sum(s.get("guard_interventions", 0) for s in sums)
        assert int(r["solved"]) == sum(s.get("solved_step") is not None for s in sums)
    # ranks follow the rule: per task, solved first, then median steps, then the final metric
    for task in ("adding-100", "copy-70"):
        ranked = sorted((r for r in rows if r["task"] == task), key=lambda r: int(r["rank"]))
        finals = [float(r["final_mean"]) for r in ranked if r["solved"] == "0"]
        assert finals == sorted(finals)


def test_report_has_the_leaderboard_the_figure_and_published_results(small: Path):
    text = small.read_text()
    board = (small.parent / "leaderboard.md").read_text()
    assert board in text and "## Published results beside ours" in text
    assert "Le, Jaitly & Hinton 2015" in text and "amarshah/complex_RNN" in text
    assert (small.parent / "figures" / "fig_benchmark.png").stat().st_size > 10_000
    cells = best_settings(settings(collect(small.parent)))
    boards = leaderboard(cells)
    best = overall(boards)[0]
    assert f"| 1 | {MODEL_NAMES[best[0]]} | {best[1]:.2f} | 2 |" in board.split("**adding")[0]


def test_cli_bad_input_is_one_line_and_status_2(tmp_path):
    for argv, needle in ((["--models", "nope"], "--models"), (["--tasks", "pmnist"], "--tasks"),
                         (["--budget", "full"], "--data-dir"), (["--seeds", "x"], "--seeds")):
        p = subprocess.run([sys.executable, "-m", "irnn.cli", "benchmark", "--out", str(tmp_path), *argv],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 2, (argv, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (argv, p.stderr)
