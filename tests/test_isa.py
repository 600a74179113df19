"""A run's ``isa`` field pins the fused kernels' instruction set, the way ``IRNN_FUSED_ISA`` does, and
only for that run: a worker trains members of different ``isa`` one after another."""
import json
import os
import subprocess
import sys

import pytest

import irnn
from irnn.engine import fused
from irnn.engine.build import ISA, set_isa
from irnn.runs.store import WALL_CLOCK_KEYS, iter_metrics

NO_EXTENSION = os.environ.get("IRNN_NO_EXTENSION", "") not in ("", "0")
SMALL = dict(model="irnn", seq_len=30, hidden_size=24, batch_size=16, steps=60, eval_every=20, log_every=20,
             train_size=256, test_size=64, seed=3, quiet=True, threads=1, engine="fused")


def _numbers(run):
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK_KEYS} for r in iter_metrics(run.path / "metrics.jsonl")]


def _recorded_isa(run):
    return json.loads((run.path / "config.json").read_text())["numerics"]["isa"]


@pytest.fixture(autouse=True)
def _reset():
    yield
    set_isa("auto")


def test_isa_field_equals_the_environment_variable_and_is_reset_per_run(tmp_path):
    if NO_EXTENSION:
        pytest.skip("IRNN_NO_EXTENSION is set")
    pinned = irnn.train(out=str(tmp_path), name="pinned", isa="generic", **SMALL)
    assert _recorded_isa(pinned) == "generic"
    after = irnn.train(out=str(tmp_path), name="after", **SMALL)  # same process, isa back to auto
    assert _recorded_isa(after) == {v: k for k, v in ISA.items()}[fused._load().best_isa()]
    # the environment variable in a fresh process gives the pinned run's numbers, bit for bit
    code = ("import irnn, sys; irnn.train(out=sys.argv[1], name='env', " +
            ", ".join(f"{k}={v!r}" for k, v in SMALL.items()) + ")")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True,
                   env={**os.environ, "IRNN_FUSED_ISA": "generic"})
    env_numbers = [{k: v for k, v in r.items() if k not in WALL_CLOCK_KEYS}
                   for r in iter_metrics(tmp_path / "env" / "metrics.jsonl")]
    assert env_numbers == _numbers(pinned)
    # and the instruction set is not a no-op: the vector kernels sum in another order
    if fused._load().best_isa() > ISA["generic"]:
        assert _numbers(after) != _numbers(pinned)


def test_an_isa_the_cpu_lacks_is_one_line(tmp_path, monkeypatch, capsys):
    if NO_EXTENSION:
        pytest.skip("IRNN_NO_EXTENSION is set")
    from irnn.cli import main

    class Baseline:  # a CPU whose best is the baseline vector code
        def best_isa(self):
            return ISA["generic"]

    monkeypatch.setattr(fused, "_load", lambda: Baseline())
    assert main(["train", "--isa", "avx2", "--steps", "2", "--out", str(tmp_path), "--name", "x", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "isa=avx2" in err and "generic" in err, err
    assert not (tmp_path / "x").exists()  # nothing half-made


def test_avx2_and_avx512_agree_bitwise_and_the_study_compares_against_generic():
    """The vector kernels add each sum in the same order with fused multiply-adds whatever the width, so
    AVX2 and AVX-512 give the same bits; only the baseline code (no FMA) rounds differently, so that is
    the second instruction set of the standard study."""
    if NO_EXTENSION:
        pytest.skip("IRNN_NO_EXTENSION is set")
    import torch

    from irnn.experiments.reproduce import second_isa

    assert second_isa() == "generic"
    if fused._load().best_isa() < ISA["avx512"]:
        pytest.skip("needs AVX-512 to compare with AVX2")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 40, 2, generator=g)
    w = [torch.randn(32, 2, generator=g) * 0.3, torch.eye(32) + 0.05 * torch.randn(32, 32, generator=g),
         torch.zeros(32), torch.zeros(32)]
    w = [t.requires_grad_() for t in w]
    results = {}
    for isa in ("avx512", "avx2", "generic"):
        set_isa(isa)
        out = fused.rnn_layer(x, *w, impl="cpp")
        results[isa] = [out.detach(), *torch.autograd.grad(out.sum(), w)]
    assert all(torch.equal(a, b) for a, b in zip(results["avx512"], results["avx2"]))
    assert not all(torch.equal(a, b) for a, b in zip(results["avx2"], results["generic"]))
