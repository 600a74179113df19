"""notebooks/pipeline.ipynb executes from top to bottom (with nbmake, as CI runs it) and is stored clean."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "pipeline.ipynb"


def test_notebook_is_stored_without_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(c["outputs"] == [] and c["execution_count"] is None for c in code)
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    # The parameters cell comes first (papermill's tag) and sends runs to IRNN_NOTEBOOK_OUT or a temp folder.
    assert "parameters" in code[0]["metadata"].get("tags", [])
    assert "IRNN_NOTEBOOK_OUT" in "".join(code[0]["source"])


def test_notebook_executes(tmp_path):
    pytest.importorskip("nbmake")
    pytest.importorskip("ipykernel")
    out = tmp_path / "runs"
    before = sorted(p.name for p in NOTEBOOK.parent.iterdir())
    stored = NOTEBOOK.read_bytes()
    env = {**os.environ, "IRNN_NOTEBOOK_OUT": str(out)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "--nbmake", "--nbmake-timeout=600", "-p", "no:cacheprovider",
                           "-q", str(NOTEBOOK)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    # It trained what it says, where it was told to, and left the repository as it was.
    for run in ("irnn", "rnn-tanh"):
        assert json.loads((out / run / "summary.json").read_text())["status"] == "completed"
    assert (out / "models" / "results.md").is_file()
    assert list((out / "models" / "figures").glob("*.png"))
    assert sorted(p.name for p in NOTEBOOK.parent.iterdir()) == before
    assert NOTEBOOK.read_bytes() == stored
