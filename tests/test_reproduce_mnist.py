"""``irnn reproduce mnist``: the study's spec, its verdict rules on synthetic runs, and one real
(tiny) study on the 8x8 digits run through the command line, resumed, and read back."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from irnn.cli import main
from irnn.config import ConfigError
from irnn.experiments import expand
from irnn.results.aggregate import Member, best_settings, settings
from irnn.experiments.mnist_study import study_spec, verdicts
from irnn.experiments.report import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED


def member(task: str, model: str, seed: int, final: float, *, seq_len: int = 784, steps: int = 3000,
           state: str = "completed") -> Member:
    config = {"task": task, "model": model, "seed": seed, "steps": steps, "optimizer": "adam", "lr": 5e-4,
              "clip_norm": 1.0, "batch_size": 32}
    evals = [(steps // 2, final / 2), (steps, final)]
    summary = {"primary_metric": "test_acc", "baseline_test_acc": 0.1, "total_steps": steps, "seq_len": seq_len,
               "final_test_acc": final, "status": state, "solved_threshold": 0.9}
    return Member(name=f"{model}-{task}__s{seed}", path=Path("/nonexistent"), config=config, state=state,
                  summary=summary, evals=evals)


def study(finals: dict[tuple[str, str], list[float]], **kw) -> list:
    """``{(task, model): [final accuracy per seed]}`` -> the chosen cells."""
    ms = [member(t, m, i, acc, **kw) for (t, m), accs in finals.items() for i, acc in enumerate(accs)]
    return best_settings(settings(ms))


def by_key(vs) -> dict[str, str]:
    return {v.key: v.verdict for v in vs}


QUICK = {"full_budget": False, "data_source": "sample5k"}
FULL = {"full_budget": True, "data_source": "idx"}


def test_mnist_and_pmnist_are_separate_cells_though_equally_long():
    cells = study({("mnist", "irnn"): [0.9, 0.92], ("pmnist", "irnn"): [0.5, 0.6]})
    assert [(c.task, c.model, c.n) for c in cells] == [("mnist", "irnn", 2), ("pmnist", "irnn", 2)]
    assert cells[0].final[0] == pytest.approx(0.91) and cells[1].final[0] == pytest.approx(0.55)


def test_accuracy_claims():
    # at the bar (97% - 2 points) on 784-step images: reproduced, whatever the budget
    v = by_key(verdicts(study({("mnist", "irnn"): [0.96, 0.95], ("pmnist", "irnn"): [0.79, 0.79]}), QUICK))
    assert v["irnn_mnist"] == REPRODUCED and v["irnn_pmnist"] == INCONCLUSIVE
    # below it: evidence of nothing at a reduced budget, "not reproduced" after the full one on all of MNIST
    low = {("mnist", "irnn"): [0.6, 0.7], ("pmnist", "irnn"): [0.5, 0.5]}
    assert by_key(verdicts(study(low), QUICK))["irnn_mnist"] == INCONCLUSIVE
    assert by_key(verdicts(study(low), {**FULL, "data_source": "sample5k"}))["irnn_mnist"] == INCONCLUSIVE
    v = by_key(verdicts(study(low), FULL))
    assert v["irnn_mnist"] == NOT_REPRODUCED and v["irnn_pmnist"] == NOT_REPRODUCED
    # the 8x8 digits are a 64-step task: never evidence either way
    v = by_key(verdicts(study({("mnist", "irnn"): [0.99, 0.99]}, seq_len=64), FULL))
    assert v["irnn_mnist"] == INCONCLUSIVE and v["irnn_pmnist"] == INCONCLUSIVE  # pmnist: not run
    # unfinished seeds keep the full budget from saying "not reproduced"
    cells = best_settings(settings([member("mnist", "irnn", 0, 0.5), member("mnist", "irnn", 1, 0.5, state="running")]))
    assert by_key(verdicts(cells, FULL))["irnn_mnist"] == INCONCLUSIVE


@pytest.mark.parametrize("irnn, tanh, expected", [
    ([0.60, 0.62, 0.58], [0.15, 0.20, 0.12], REPRODUCED),      # 45 points ahead, small spread
    ([0.60, 0.62, 0.58], [0.55, 0.52, 0.57], INCONCLUSIVE),    # ahead by 6 points: not "far"
    ([0.30, 0.70, 0.50], [0.20, 0.25, 0.30], INCONCLUSIVE),    # 25 points, but spread 20: not > 2 std
    ([0.40, 0.42, 0.44], [0.45, 0.50, 0.55], NOT_REPRODUCED),  # the tanh RNN is ahead
    ([0.11, 0.12, 0.10], [0.10, 0.11, 0.12], INCONCLUSIVE),    # neither learned
])
def test_irnn_against_tanh(irnn, tanh, expected):
    cells = study({("pmnist", "irnn"): irnn, ("pmnist", "rnn-tanh"): tanh})
    v = {x.key: x for x in verdicts(cells, QUICK)}
    assert v["irnn_beats_tanh_pmnist"].verdict == expected, v["irnn_beats_tanh_pmnist"].summary
    assert "the IRNN leads by" in v["irnn_beats_tanh_pmnist"].summary
    assert v["irnn_beats_tanh_mnist"].verdict == INCONCLUSIVE and "not run" in v["irnn_beats_tanh_mnist"].summary


def test_irnn_against_tanh_on_short_images_is_inconclusive():
    far = {("mnist", "irnn"): [0.6, 0.6], ("mnist", "rnn-tanh"): [0.2, 0.2]}
    assert by_key(verdicts(study(far), QUICK))["irnn_beats_tanh_mnist"] == REPRODUCED
    assert by_key(verdicts(study(far, seq_len=64), QUICK))["irnn_beats_tanh_mnist"] == INCONCLUSIVE


def test_study_specs_say_what_quick_cuts():
    spec, meta = study_spec("quick")
    members = expand(spec)
    assert len(members) == 2 * 4 * 3  # tasks x models x seeds: the LSTM is in
    assert {c.data_source for c in members.values()} == {"sample5k"}
    assert {c.model for c in members.values()} == {"irnn", "rnn-tanh", "rnn-relu", "lstm"}
    assert {c.task for c in members.values()} == {"mnist", "pmnist"} and not meta["full_budget"]
    text = " ".join(meta["reductions"])
    assert "left out" not in text and "5,000-image MNIST sample" in text and "rmsprop lr 1e-06" in text
    _, meta = study_spec("quick", models=["irnn", "rnn-tanh"])
    assert "models: RNN + ReLU (Gaussian init), LSTM left out" in " ".join(meta["reductions"])
    spec, meta = study_spec("full", data_dir="/data/mnist")
    members = expand(spec)
    assert len(members) == 2 * 4 * 3 and meta["full_budget"] and not meta["reductions"]
    one = next(iter(members.values()))
    assert (one.data_source, one.optimizer, one.lr, one.epochs, one.batch_size, one.input_std) == \
        ("idx", "rmsprop", 1e-6, 900, 32, 0.001)
    assert one.total_steps(60_000) == 1_687_500  # the Keras reproduction's 900 epochs
    _, meta = study_spec("full", data_dir="/data/mnist", seeds=1)
    assert not meta["full_budget"] and meta["reductions"] == ["1 seed (full: 3)"]
    for kw in ({"models": ["irnn", "gru"]}, {"tasks": ["cifar"]}, {"data_source": "svhn"}, {"seeds": 0},
               {"steps": 0}, {"data_dir": "/data"}):
        with pytest.raises(ConfigError):
            study_spec("quick", **kw)
    with pytest.raises(ConfigError, match="--data-dir"):
        study_spec("full")


@pytest.mark.parametrize("argv, message", [
    (["--lengths", "150"], "--lengths is for the adding study"),
    (["--preset", "paper"], "--preset is for the adding study"),
    (["--data-source", "idx"], "needs --data-dir"),
    (["--tasks", "mnist,cifar"], "--tasks takes some of mnist, pmnist"),
    (["--models", ","], "--models takes names"),
    (["--budget", "medium"], "invalid choice"),
])
def test_bad_mnist_study_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    assert main(["reproduce", "mnist", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not any(tmp_path.iterdir())


def test_mnist_flags_on_the_adding_study_are_refused(tmp_path, capsys):
    assert main(["reproduce", "adding", "--out", str(tmp_path), "--data-dir", str(tmp_path)]) == 2
    assert "--data-dir is for the mnist study" in capsys.readouterr().err


def test_a_tiny_mnist_study_end_to_end(tmp_path, capsys):
    """The real pipeline on the 8x8 digits: train, aggregate, figures, report; a second run resumes."""
    argv = ["reproduce", "mnist", "--data-source", "digits", "--steps", "60", "--seeds", "2",
            "--models", "irnn,rnn-tanh", "--out", str(tmp_path), "--name", "tiny"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    path = tmp_path / "tiny"
    report = (path / "report.md").read_text()
    for claim in ("about 97% test accuracy on pixel-by-pixel MNIST", "about 82% test accuracy on permuted MNIST",
                  "far more accurate than the tanh RNN on pixel-by-pixel MNIST",
                  "far more accurate than the tanh RNN on permuted MNIST"):
        assert claim in report and claim in out
    assert report.count(f"**{INCONCLUSIVE}**") == 4  # 64-step images say nothing about the 784-step claims
    assert "64-step images, not the paper's 784" in report and "8x8 digits" in report
    rows = list(csv.DictReader((path / "results.csv").open()))
    assert sorted((r["task"], r["model"]) for r in rows) == [("mnist", "irnn"), ("mnist", "rnn-tanh"),
                                                             ("pmnist", "irnn"), ("pmnist", "rnn-tanh")]
    for r in rows:
        assert r["seeds"] == "2" and r["finished"] == "2" and 0.0 <= float(r["final_mean"]) <= 1.0
        assert r["budget_steps"] == "60" and r["seq_len"] == "64"
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        assert (path / link).is_file() and (path / link).stat().st_size > 10_000
    assert "Test accuracy against training steps, per task" in report
    # every pmnist run stores its permutation; all four models of a task share it
    hashes = {json.loads(p.read_text())["task"]["perm_sha256"] for p in path.glob("members/*pmnist*/config.json")}
    assert len(hashes) == 1
    # the measured numbers are in the table: each member's final accuracy from its own summary
    finals = {p.parent.name: json.loads(p.read_text())["final_test_acc"] for p in path.glob("members/*/summary.json")}
    assert len(finals) == 8 and all(0.0 <= v <= 1.0 for v in finals.values())
    before = (path / "results.csv").read_text()
    assert main(argv) == 0  # resume: nothing left to train, same table
    assert (path / "results.csv").read_text() == before
    assert "2 invocations" in (path / "report.md").read_text()


def test_missing_data_stops_the_study_before_any_member(tmp_path, capsys):
    empty = tmp_path / "mnist"
    empty.mkdir()
    assert main(["reproduce", "mnist", "--budget", "full", "--data-dir", str(empty), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not found in" in err[0] and "--download" in err[0]
    assert not (tmp_path / "o").exists()


def test_a_study_without_the_guard():
    from irnn.experiments.report import NO_GUARD_TEXT

    spec, meta = study_spec("quick", guard=False)
    assert spec.name == "mnist-quick-noguard" and spec.base["guard"] is False and NO_GUARD_TEXT in meta["reductions"]
    spec, meta = study_spec("quick")
    assert spec.name == "mnist-quick" and "guard" not in spec.base and NO_GUARD_TEXT not in meta["reductions"]
