"""The benchmark script runs end to end (tiny sizes) and prints its table and the ensemble ratio."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_step_prints_every_engine_and_the_ensemble_baseline():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_step.py"), "--seq-len", "12",
                          "--threads", "1", "--ensemble", "2", "--repeats", "1", "--steps", "1", "--batch", "4"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and not line.startswith("| engine")]
    names = [r.split("|")[1].strip() for r in rows]
    assert names[:4] == ["nn.RNN eager", "prototype pipeline", names[2], "nn.LSTM eager"]
    assert names[2].startswith("irnn default (") and any(n.startswith("ensemble N=2 (") for n in names)
    assert any(n.startswith("2 models one after another (") for n in names)
    for r in rows:  # ms/step and the ratio are positive numbers
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert float(cells[3]) > 0 and float(cells[6].rstrip("x")) > 0
    assert re.search(r"ensemble N=2, T=12, 1 thread\(s\): [0-9.]+x the throughput of the same 2 models", out.stdout)
