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
