"""End to end: the CLI in a subprocess writes a complete run folder that `irnn show` reads."""
import json
import subprocess
import sys

import pytest

TINY = ["--seq-len", "12", "--steps", "60", "--eval-every", "20", "--log-every", "10", "--train-size", "500",
        "--test-size", "200", "--quiet"]


def irnn(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "irnn.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_tiny_run_writes_documented_files_and_show_reads_them(tmp_path):
    r = irnn("train", *TINY, "--out", str(tmp_path), "--name", "tiny", "--seed", "3")
    assert r.returncode == 0, r.stderr
    run = tmp_path / "tiny"
    assert f"run stored in {run}" in r.stdout and "final test_mse" in r.stdout
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["config"]["seq_len"] == 12 and cfg["config"]["seed"] == 3 and cfg["config"]["preset"] == "quick"
    for key in ("versions", "device", "engine"):
        assert key in cfg
    assert cfg["versions"]["torch"] and cfg["versions"]["irnn"]
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("step" in l and "kind" in l for l in lines)
    train = [l for l in lines if l["kind"] == "train"]
    evals = [l for l in lines if l["kind"] == "eval"]
    assert [l["step"] for l in train] == list(range(10, 61, 10))
    assert [l["step"] for l in evals] == [20, 40, 60]
    for key in ("train_loss", "grad_norm", "lr", "samples_per_s"):
        assert key in train[0]
    assert "test_mse" in evals[0]
    summary = json.loads((run / "summary.json").read_text())
    for key in ("status", "steps", "best_test_mse", "final_test_mse", "baseline_mse", "wall_time_s"):
        assert key in summary
    assert summary["status"] == "completed" and summary["steps"] == 60
    assert summary["final_test_mse"] == evals[-1]["test_mse"]
    assert summary["baseline_mse"] == pytest.approx(1 / 6)
    assert list((run / "checkpoints").glob("ckpt-*.pt")) and (run / "checkpoints" / "best.pt").exists()

    shown = irnn("show", str(run))
    assert shown.returncode == 0 and "final test_mse" in shown.stdout and "baseline" in shown.stdout
    as_json = json.loads(irnn("show", str(run), "--json").stdout)
    assert as_json == summary

    again = irnn("train", *TINY, "--out", str(tmp_path), "--name", "tiny")
    assert again.returncode == 2 and "already exists" in again.stderr
    assert json.loads((run / "summary.json").read_text()) == summary


@pytest.mark.parametrize("args,needle", [
    (["--seq-len", "1"], "seq_len must be >= 2"),
    (["--batch-size", "0"], "batch_size must be > 0"),
    (["--hidden-size", "-3"], "hidden_size must be > 0"),
    (["--steps", "0"], "steps must be > 0"),
    (["--lr", "0"], "lr must be > 0"),
    (["--clip-norm", "-1"], "clip_norm must be > 0"),
    (["--model", "transformer"], "unknown model 'transformer'"),
    (["--optimizer", "lbfgs"], "unknown optimizer 'lbfgs'"),
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--variant", "middle"], "unknown variant 'middle'"),
    (["--out", "/proc/forbidden"], "cannot create runs folder"),
])
def test_bad_input_one_line_exit_2(args, needle, tmp_path):
    r = irnn("train", *args, cwd=tmp_path)
    assert r.returncode == 2
    assert needle in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_help_reads_well():
    r = irnn("train", "--help")
    assert r.returncode == 0
    for flag in ("--task", "--variant", "--seq-len", "--model", "--hidden-size", "--init-scale", "--optimizer",
                 "--lr", "--clip-norm", "--batch-size", "--steps", "--train-size", "--test-size", "--eval-every",
                 "--seed", "--preset", "--device", "--out", "--name", "--quiet"):
        assert flag in r.stdout
    assert "inject" not in r.stdout  # test-only option stays hidden


def test_bad_input_is_answered_without_loading_torch(tmp_path):
    """`import irnn` and the command line's input checks do not import torch (about 1.5 s)."""
    code = ("import sys, irnn; from irnn.cli import main\n"
            "codes = [main(['train', '--lr', 'abc']), main(['reproduce', 'mnist', '--lengths', '150']),\n"
            "         main(['sweep', '--name', 'x', '--grid', 'lr=a'])]\n"
            "print(codes, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.stdout.strip() == "[2, 2, 2] False", out.stdout + out.stderr
    assert not any(tmp_path.iterdir())  # and nothing written
    assert len(out.stderr.strip().splitlines()) == 3
