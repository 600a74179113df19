"""The benchmark script runs end to end (tiny sizes) and prints its table and the ensemble ratio."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
HAS_PROC = os.access("/proc/self/clear_refs", os.W_OK)  # where resident-memory peaks can be reset


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_step", ROOT / "benchmarks" / "bench_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_step_prints_every_engine_and_the_ensemble_baseline():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_step.py"), "--seq-len", "12",
                          "--threads", "1", "--ensemble", "2", "--repeats", "1", "--steps", "1", "--batch", "4"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and not line.startswith("| engine")]
    names = [r.split("|")[1].strip() for r in rows]
    assert names[:9] == ["nn.RNN eager", "prototype pipeline", names[2], "nn.RNN tanh eager", names[4],
                         "nn.LSTM eager", names[6], "nn.GRU eager", names[8]]
    assert names[2].startswith("irnn default (") and any(n.startswith("ensemble N=2 (") for n in names)
    assert names[4].startswith("RNN-TANH default (")
    assert names[6].startswith("LSTM default (") and names[8].startswith("GRU default (")
    assert any(n.startswith("2 models one after another (") for n in names)
    for r in rows:  # ms/step and the ratio are positive numbers; each row has its own peak memory
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert float(cells[3]) > 0 and float(cells[7].rstrip("x")) > 0
        assert cells[6] == "n/a" if not HAS_PROC else float(cells[6]) >= 0
    assert re.search(r"ensemble N=2, T=12, 1 thread\(s\): [0-9.]+x the throughput of the same 2 models", out.stdout)
    for kind, module in (("RNN-TANH", "nn.RNN tanh"), ("LSTM", "nn.LSTM"), ("GRU", "nn.GRU")):
        assert re.search(rf"{kind} default, T=12, 1 thread\(s\), batch 4: [0-9.]+x the speed of {module} eager",
                         out.stdout)


def test_bench_step_only_keeps_the_named_rows_and_the_baseline():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_step.py"), "--seq-len", "12",
                          "--threads", "1", "--ensemble", "2", "--repeats", "1", "--steps", "1", "--batch", "4",
                          "--only", "tanh", "TANH"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and not line.startswith("| engine")]
    names = [r.split("|")[1].strip() for r in rows]
    assert names[:2] == ["nn.RNN eager", "nn.RNN tanh eager"] and names[2].startswith("RNN-TANH default (")
    assert len(names) == 3


@pytest.mark.skipif(not HAS_PROC, reason="resident-memory peaks need Linux /proc")
def test_peak_memory_sees_what_a_step_allocates_and_not_what_came_before():
    bench = load_bench()
    held = torch.ones(32 * 2**20 // 4)  # 32 MiB resident before the measurement: not the engine's
    step, peak = bench.build_with_peak(lambda: lambda: torch.ones(64 * 2**20 // 4).sum(), torch.device("cpu"))
    assert 60 <= peak < 90, peak  # one 64 MiB tensor alive at a time, freed after each step
    _, small = bench.build_with_peak(lambda: lambda: torch.ones(1000).sum(), torch.device("cpu"))
    assert small < 8, small
    del held


def test_bench_models_times_every_registered_model():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_models.py"), "--task", "copy", "--seq-len",
                          "4", "--batch", "4", "--repeats", "1", "--steps", "1"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {r.split("|")[1].strip(): r for r in out.stdout.splitlines() if r.startswith("| ") and "---" not in r}
    from irnn import registry

    assert {n for n in registry.model_names() if registry.model_spec(n).builtin} <= set(rows)
    assert "fused" in rows["indrnn"] and "torch" in rows["exprnn"]
    assert float(rows["irnn"].split("|")[4].strip().rstrip("x")) == 1.0
