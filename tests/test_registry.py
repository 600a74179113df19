"""A model from outside the package: this file defines a toy model and registers it, then trains it
through the public API and through the command line (which imports this very file as a plugin, with
``IRNN_PLUGINS``), without touching the package. Also: options, their errors, and what discovers them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from irnn import registry
from irnn.config import ConfigError, from_dict
from irnn.registry import ModelSpec, Option, register_model

ROOT = Path(__file__).resolve().parents[1]


class LeakyRNN(nn.Module):
    """The toy: ``h_t = (1 - a) h_{t-1} + a tanh(W x_t + U h_{t-1})``, in plain PyTorch."""

    def __init__(self, input_size, hidden_size, output_size, leak, per_step):
        super().__init__()
        self.leak, self.per_step = leak, per_step
        self.w = nn.Linear(input_size, hidden_size)
        self.u = nn.Linear(hidden_size, hidden_size, bias=False)
        self.readout = nn.Linear(hidden_size, output_size)

    def forward(self, x):
        h, states = x.new_zeros(x.shape[0], self.u.in_features), []
        for t in range(x.shape[1]):
            h = (1 - self.leak) * h + self.leak * torch.tanh(self.w(x[:, t]) + self.u(h))
            states.append(h)
        return self.readout(torch.stack(states, 1) if self.per_step else h)


def build_leaky(cfg, input_size, output_size, per_step=False):
    return LeakyRNN(input_size, cfg.hidden_size, output_size, registry.option(cfg, "toy_leak"), per_step)


register_model(ModelSpec("toy-leaky", build_leaky, label="Leaky toy RNN", doc="a test's own model",
                         options=(Option("toy_leak", 0.5, "toy-leaky: the leak a", minimum=0.0),),
                         hparams=("toy_leak",), color="#000000"), replace=True)


def test_the_toy_trains_through_the_api_with_its_option(tmp_path):
    from irnn import train

    run = train(from_dict(dict(model="toy-leaky", toy_leak=0.25, seq_len=8, hidden_size=8, steps=6,
                               eval_every=3, log_every=3, train_size=64, test_size=32, batch_size=8,
                               quiet=True, out=str(tmp_path), name="toy")))
    assert run.summary["status"] == "completed" and run.summary["engine"] == "torch"
    stored = json.loads((tmp_path / "toy" / "config.json").read_text())["config"]
    assert stored["model"] == "toy-leaky" and stored["options"] == {"toy_leak": 0.25}
    evals = [r for r in run.metrics("eval")]
    assert [r["step"] for r in evals] == [3, 6] and all(r["test_mse"] > 0 for r in evals)


def test_the_toy_reads_out_every_step_on_the_copy_task(tmp_path):
    from irnn import train

    run = train(from_dict(dict(model="toy-leaky", task="copy", seq_len=5, copy_symbols=2, hidden_size=8,
                               steps=4, eval_every=2, log_every=2, test_size=16, batch_size=4, quiet=True,
                               out=str(tmp_path), name="toy-copy")))
    s = run.summary
    assert s["primary_metric"] == "test_ce" and s["label"] == "toy-leaky-copy5"
    assert s["baseline_test_ce"] == pytest.approx(2 * torch.log(torch.tensor(8.0)).item() / 9)


def _cli(args, tmp_path, plugin=True):
    env = {**os.environ, "IRNN_PLUGINS": str(Path(__file__).resolve()) if plugin else ""}
    return subprocess.run([sys.executable, "-m", "irnn.cli", *args], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=env)


def test_the_toy_trains_through_the_cli_and_show_lists_it(tmp_path):
    out = _cli(["train", "--model", "toy-leaky", "--toy-leak", "0.75", "--seq-len", "6", "--hidden-size", "4",
                "--steps", "4", "--eval-every", "2", "--log-every", "2", "--train-size", "32", "--test-size", "16",
                "--batch-size", "8", "--quiet", "--out", "runs", "--name", "toy"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    cfg = json.loads((tmp_path / "runs" / "toy" / "config.json").read_text())["config"]
    assert cfg["options"] == {"toy_leak": 0.75}
    helped = _cli(["train", "--help"], tmp_path)
    assert "toy-leaky" in helped.stdout and "--toy-leak" in helped.stdout and "--chrono-tmax" in helped.stdout
    shown = _cli(["show", "runs/toy"], tmp_path)
    assert shown.returncode == 0 and "toy-leaky" in shown.stdout, shown.stdout + shown.stderr


@pytest.mark.parametrize("args, message", [
    (["--model", "nope"], "unknown model 'nope'"),
    (["--toy-leak", "0.3"], "toy_leak is an option of the model toy-leaky, not of this run's model irnn"),
    (["--model", "toy-leaky", "--toy-leak", "-1"], "toy_leak must be >= 0.0"),
    (["--model", "rnn-orth", "--orth-nonlinearity", "sigmoid"], "unknown orth_nonlinearity 'sigmoid'"),
    (["--model", "chrono-lstm", "--chrono-tmax", "1.5"], "chrono_tmax must be an integer"),
])
def test_bad_options_are_one_line_and_exit_2(tmp_path, args, message):
    out = _cli(["train", *args, "--steps", "1", "--out", "runs"], tmp_path)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()


def test_without_the_plugin_the_toy_is_unknown(tmp_path):
    out = _cli(["train", "--model", "toy-leaky", "--steps", "1"], tmp_path, plugin=False)
    assert out.returncode == 2 and "unknown model 'toy-leaky'" in out.stderr


def test_a_bad_plugin_is_one_line_and_exit_2(tmp_path):
    env = {**os.environ, "IRNN_PLUGINS": str(tmp_path / "missing.py")}
    out = subprocess.run([sys.executable, "-m", "irnn.cli", "train", "--steps", "1"], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path, env=env)
    assert out.returncode == 2 and "IRNN_PLUGINS: no such file" in out.stderr, out.stderr


def test_options_follow_the_model_and_refuse_other_models():
    cfg = from_dict(dict(model="chrono-lstm"))
    assert cfg.options == {"chrono_tmax": 0}  # filled with its default
    assert from_dict(dict(model="chrono-lstm", chrono_tmax="400")).options == {"chrono_tmax": 400}
    assert cfg.replace(model="irnn").options == {}  # irnn takes none: dropped, not an error
    assert from_dict(dict(task="copy")).options == {"copy_symbols": 10}
    with pytest.raises(ConfigError, match="indrnn_gamma is an option of the model indrnn"):
        from_dict(dict(model="irnn", indrnn_gamma=2.0))
    with pytest.raises(ConfigError, match="did you mean 'chrono_tmax'"):
        from_dict(dict(model="chrono-lstm", chrono_tmx=3))


def test_registering_refuses_clashes():
    with pytest.raises(registry.RegistryError, match="already registered"):
        register_model(ModelSpec("irnn", build_leaky))
    with pytest.raises(registry.RegistryError, match="not a Config field"):
        register_model(ModelSpec("toy-bad", build_leaky, options=(Option("lr", 1.0, "clashes"),)))
    with pytest.raises(registry.RegistryError, match="already toy-leaky's"):
        register_model(ModelSpec("toy-bad", build_leaky, options=(Option("toy_leak", 1.0, "clashes"),)))
    assert "toy-bad" not in registry.model_names()


def test_tables_and_figures_name_and_colour_registered_models():
    from irnn.results.aggregate import MODEL_NAMES, hparams
    from irnn.results.figures import model_color

    assert MODEL_NAMES["toy-leaky"] == "Leaky toy RNN" and MODEL_NAMES["np-rnn"] == "np-RNN"
    assert MODEL_NAMES.get("gone", "gone") == "gone"  # a run of a model no longer registered
    assert model_color("toy-leaky") == "#000000" and model_color("unknown", "0.2") == "0.2"
    cfg = from_dict(dict(model="toy-leaky", toy_leak=0.1)).to_dict()
    assert hparams(cfg)["toy_leak"] == 0.1
    # a sweep that varies another model's option does not show it on this one's row
    assert "toy_leak" not in hparams(from_dict(dict(model="irnn")).to_dict(), extra=["toy_leak", "lr"])
