"""The README's Python examples run as written (the quick ones: the training example takes minutes)."""
import re
from pathlib import Path

import torch

from irnn.engine import fused

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_training_step_example_runs():
    [block] = [b for b in python_blocks() if "make_train_step" in b]
    ns: dict = {}
    exec(compile(block, "README.md", "exec"), ns)  # noqa: S102 - our own documentation
    assert ns["engine"] == ("fused" if fused.available() else "torch")
    assert torch.isfinite(ns["loss"]) and torch.isfinite(ns["grad_norm"])
    assert ns["states"].shape == (16, 150, 100)
    # the step reached the optimiser, through the parameters the fused backward filled in
    assert ns["model"].rnn.weight_hh_l0.grad is not None
    assert ns["opt"].state[ns["model"].rnn.weight_hh_l0]["step"] == 1


def shell_commands() -> list[str]:
    """Every ``irnn ...`` command line in the README's bash/text blocks, its comment cut off."""
    blocks = re.findall(r"```(?:bash|text)\n(.*?)```", README.read_text(), flags=re.S)
    lines = [line.strip().removeprefix("$ ") for b in blocks for line in b.splitlines()]
    return [line.split("  #")[0].split(" # ")[0].strip() for line in lines
            if line.startswith("irnn ") and "..." not in line]


def test_every_readme_command_parses():
    import shlex

    from irnn.cli import build_parser

    commands = shell_commands()
    assert len(commands) >= 8 and "irnn train --out /tmp/mainjob" in commands
    for command in commands:
        try:
            build_parser().parse_args(shlex.split(command)[1:])
        except SystemExit as e:
            raise AssertionError(f"README command does not parse: {command}") from e


def test_readme_api_example_runs_as_written(tmp_path, monkeypatch):
    """The first Python block, imports included; only its step budget is cut (10,000 steps take minutes)."""
    block = next(b for b in python_blocks() if "irnn.Config(" in b)
    assert "steps=10_000" in block
    monkeypatch.chdir(tmp_path)  # irnn.train stores its run under ./runs
    ns: dict = {}
    exec(compile(block.replace("steps=10_000", "steps=20, eval_every=10, train_size=256, test_size=64"),  # noqa: S102
                 "README.md", "exec"), ns)
    assert ns["run"].summary["steps"] == 20 and ns["run"].path.resolve().parent == tmp_path / "runs"
    assert len(ns["steps"]) == len(ns["mse"]) == 2
    assert ns["x"].shape == (1000, 150, 2) and ns["y"].shape[0] == 1000
    assert ns["model"].rnn.weight_hh_l0.shape == (100, 100)
