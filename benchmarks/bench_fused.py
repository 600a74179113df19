"""Training-step speed of the fused C++ RNN engine against nn.RNN eager, on the CPU.

One step = forward, MSE loss, backward, ``clip_grad_norm_(1.0)``, Adam step: an IRNN with hidden
100 and batch 16 on adding-problem inputs. All engines run in this one process, interleaved sample
by sample, so load from other processes hits them alike; the table gives medians and the ratio of
medians against ``nn.RNN`` (the baseline, with PyTorch's default Adam).

    PYTHONPATH=src python benchmarks/bench_fused.py --threads 1 2 --seq-len 150 400 --repeats 30
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from irnn.engine import fused
from irnn.models import RecurrentModel
from irnn.tasks.adding import generate

BASELINE = "nn.RNN"


def make_step(engine: str, model: RecurrentModel, adam_fused: bool, clip_norm: float = 1.0):
    """A closure running one training step of ``model`` on a batch with the given engine."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=adam_fused or None)
    params = list(model.parameters())

    def features(x):
        if engine.startswith("nn.RNN"):
            return model.features(x)
        return fused.rnn_forward(model.rnn, x, impl="python" if engine.startswith("python") else "cpp")[:, -1]

    def step(x, y):
        loss = F.mse_loss(model.readout(features(x)), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def run(engines: list[str], seq_len: int, threads: int, repeats: int, steps: int, batch: int, hidden: int,
        seed: int, kind: str = "irnn") -> dict[str, list[float]]:
    """ms per step samples of each engine (each sample is the mean over ``steps`` steps)."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    batches = [generate(batch, seq_len, generator=g) for _ in range(8)]  # x [B, T, 2], y [B, 1]
    base = RecurrentModel(kind, 2, hidden, 1)
    # "+fA" engines use torch.optim.Adam(fused=True).
    runners = {e: make_step(e, copy.deepcopy(base), adam_fused=e.endswith("+fA")) for e in engines}
    for e, step in runners.items():  # warm-up (and the one-time build of the extension)
        for i in range(3):
            step(*batches[i % len(batches)])
    samples = {e: [] for e in engines}
    k = 0
    for _ in range(repeats):
        for e, step in runners.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                step(*batches[k % len(batches)])
                k += 1
            samples[e].append((time.perf_counter() - t0) * 1e3 / steps)
    return samples


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts to measure")
    parser.add_argument("--seq-len", type=int, nargs="+", default=[150, 400], help="sequence lengths T")
    parser.add_argument("--repeats", type=int, default=20, help="timed samples per engine and setting")
    parser.add_argument("--steps", type=int, default=5, help="training steps per timed sample")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--hidden-size", type=int, default=100)
    parser.add_argument("--engines", nargs="+",
                        default=[BASELINE, "nn.RNN+fA", "fused", "fused+fA"],
                        help="nn.RNN, fused (C++), python (reference autograd.Function); "
                             "suffix +fA for Adam(fused=True)")
    parser.add_argument("--model", default="irnn", choices=["irnn", "rnn-relu", "rnn-tanh"],
                        help="irnn (the benchmark), or a plain relu/tanh RNN, whose states are rarely exactly 0")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.set_flush_denormal(True)  # decaying ReLU-RNN gradients turn denormal; see PERF_NOTES.md
    engines = [BASELINE] + [e for e in args.engines if e != BASELINE]
    if any(e.startswith("fused") for e in engines) and not fused.available():
        raise SystemExit("the fused C++ engine is unavailable (IRNN_NO_EXTENSION set or build failed)")
    print(f"{args.model}, torch {torch.__version__}, B={args.batch_size}, H={args.hidden_size}, input 2, fp32, "
          f"{args.repeats} samples x {args.steps} steps, medians")
    same_adam = "nn.RNN+fA" in engines
    print(f"{'engine':<12} {'T':>5} {'threads':>7} {'ms/step':>9} {'IQR':>13} {'samples/s':>10} {'vs nn.RNN':>10}"
          + (f" {'vs nn.RNN+fA':>13}" if same_adam else ""))
    for seq_len in args.seq_len:
        for threads in args.threads:
            samples = run(engines, seq_len, threads, args.repeats, args.steps, args.batch_size, args.hidden_size,
                          args.seed, args.model)
            base = statistics.median(samples[BASELINE])
            base_fa = statistics.median(samples["nn.RNN+fA"]) if same_adam else None
            for e in engines:
                med = statistics.median(samples[e])
                q = statistics.quantiles(samples[e], n=4)
                print(f"{e:<12} {seq_len:>5} {threads:>7} {med:>9.2f} {q[0]:>6.2f}-{q[2]:<6.2f} "
                      f"{args.batch_size * 1e3 / med:>10.0f} {base / med:>9.2f}x"
                      + (f" {base_fa / med:>12.2f}x" if same_adam else ""), flush=True)


if __name__ == "__main__":
    main()
