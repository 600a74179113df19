"""The copy-memory task: its sequences, its baseline, its solved rule, and a run on it."""
from __future__ import annotations

import math

import pytest
import torch

from irnn.config import from_dict
from irnn.tasks import make_task
from irnn.tasks.copy import CLASSES_IN, CLASSES_OUT, DELIMITER, baseline_ce, generate, make_copy


def test_sequences_are_symbols_blanks_delimiter_and_the_recall():
    T, K = 15, 10
    x, y = generate(64, T, K, generator=torch.Generator().manual_seed(3))
    assert x.shape == (64, T + 2 * K, CLASSES_IN) and y.shape == (64, T + 2 * K)
    assert torch.equal(x.sum(-1), torch.ones(64, T + 2 * K))  # one-hot
    idx = x.argmax(-1)
    data = idx[:, :K]
    assert data.min() >= 1 and data.max() <= 8 and len(data.unique()) == 8
    assert not idx[:, K:T + K - 1].any()  # T - 1 blanks
    assert (idx[:, T + K - 1] == DELIMITER).all() and not idx[:, T + K:].any()  # delimiter, K blanks
    assert not y[:, :T + K].any() and torch.equal(y[:, T + K:], data)  # T + K blanks, then the symbols
    again, _ = generate(64, T, K, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again, x)


def test_baseline_is_the_memoryless_strategy():
    assert baseline_ce(200) == pytest.approx(10 * math.log(8) / 220)
    task = make_copy(30, 10, test_size=500, seed=1)
    # predict blanks until the delimiter, then uniform over the 8 symbols
    L = 50
    logits = torch.full((500, L, CLASSES_OUT), -1e9, dtype=torch.float64)
    logits[:, :40, 0] = 0.0
    logits[:, 40:, 1:] = 0.0
    m = task.metrics_fn(logits, task.test_y)
    assert m["test_ce"] / 500 == pytest.approx(task.baseline, rel=1e-9)
    assert task.solved_threshold == pytest.approx(0.1 * task.baseline)
    # and recalling everything solves it
    perfect = torch.full((500, L, CLASSES_OUT), -30.0, dtype=torch.float64).scatter(2, task.test_y[..., None], 30.0)
    pm = task.metrics_fn(perfect, task.test_y)
    assert pm["test_ce"] / 500 < task.solved_threshold and pm["test_acc"] / 500 == 1.0


def test_the_config_names_the_task_and_its_length():
    cfg = from_dict(dict(task="copy", seq_len=100, copy_symbols=5, test_size=8))
    assert cfg.sequence_length() == 110
    task = make_task(cfg)
    assert task.per_step and task.name == "copy-100" and task.test_x.shape == (8, 110, CLASSES_IN)
    assert task.train_x is None  # drawn fresh every step


def test_a_copy_run_learns_the_blanks_and_reports_its_metrics(tmp_path):
    from irnn import train

    run = train(from_dict(dict(task="copy", model="lstm", seq_len=10, copy_symbols=3, hidden_size=32, lr=0.01,
                               steps=150, eval_every=50, log_every=50, test_size=200, batch_size=32, quiet=True,
                               out=str(tmp_path), name="copy")))
    s = run.summary
    assert s["status"] == "completed" and s["primary_metric"] == "test_ce" and s["label"] == "lstm-copy10"
    assert s["solved_threshold"] == pytest.approx(0.1 * s["baseline_test_ce"])
    evals = run.metrics("eval")
    assert evals[0]["test_ce"] < math.log(9)  # better than uniform over 9 classes: the blanks are learnt
    assert 0.0 <= evals[-1]["test_acc"] <= 1.0
