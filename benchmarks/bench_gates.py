"""The fused LSTM/GRU engine against nn.LSTM/nn.GRU eager and against the arithmetic floor.

One full training step each (forward, loss on the last state, backward, clip, Adam) through the library's
``make_train_step``, engines interleaved in one process, medians over repeats. The floor is the step's
dense arithmetic at this process's sgemm rate (same thread count), measured in the same process:

    FLOPs = 3 * 2 * B * T * H * G*H      (forward h W_hh^T, backward dB W_hh and h^T dB; G = 4 LSTM, 3 GRU)
    floor = FLOPs / (sgemm GFLOP/s of a [256,512]x[512,512] product)

The input projection (input 2), gates, readout and optimiser are left out of the FLOPs, so the floor is a
lower bound.

    python benchmarks/bench_gates.py                        # T=150, B=32, H=100, one thread
    python benchmarks/bench_gates.py --seq-len 150 400 --batch 16 32 --threads 1 2
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from irnn.config import Config
from irnn.engine import make_train_step, resolve_engine
from irnn.models import build_model
from irnn.tasks import make_adding
from irnn.train.optim import make_optimizer


def make_step(kind: str, engine: str, seq_len: int, batch: int):
    cfg = Config(model=kind, seq_len=seq_len, batch_size=batch, engine=engine, optimizer="adam", lr=1e-4)
    task = make_adding(seq_len, train_size=batch * 64, test_size=16, seed=0)
    torch.manual_seed(0)
    model = build_model(cfg, task.input_size, task.output_size)
    resolved = resolve_engine(engine, model, torch.device("cpu"), cfg.optimizer)
    step = make_train_step(model, resolved, task.loss_fn, make_optimizer(cfg, model.parameters()), cfg.clip_norm,
                           task.batch(0, batch, 0))
    counter = [0]

    def run():
        step(*task.batch(counter[0], batch, 0))
        counter[0] += 1

    return run, resolved


def sgemm(reps: int = 10):
    a, b = torch.randn(256, 512), torch.randn(512, 512)
    return lambda: [torch.mm(a, b) for _ in range(reps)], reps * 2 * 256 * 512 * 512


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, nargs="+", default=[150])
    ap.add_argument("--batch", type=int, nargs="+", default=[32])
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--hidden", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    print("| model | T | B | threads | eager ms | fused ms | fused vs eager | floor ms | fused / floor |")
    print("|---|---|---|---|---|---|---|---|---|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for seq_len in args.seq_len:
            for batch in args.batch:
                for kind, gates in (("lstm", 4), ("gru", 3)):
                    eager, _ = make_step(kind, "torch", seq_len, batch)
                    fused, resolved = make_step(kind, "auto", seq_len, batch)
                    gemm, gemm_flops = sgemm()
                    fns = {"eager": eager, "fused": fused, "sgemm": gemm}
                    for fn in fns.values():
                        for _ in range(2):
                            fn()
                    times: dict[str, list[float]] = {k: [] for k in fns}
                    for _ in range(args.repeats):
                        for name, fn in fns.items():  # interleaved: the same load hits all three
                            t = time.perf_counter()
                            for _ in range(args.steps):
                                fn()
                            times[name].append((time.perf_counter() - t) / args.steps * 1000)
                    med = {k: statistics.median(v) for k, v in times.items()}
                    flops = 3 * 2 * batch * seq_len * args.hidden * gates * args.hidden
                    peak = gemm_flops / med["sgemm"] / 1e6  # GFLOP/s
                    floor = flops / peak / 1e6
                    print(f"| {kind} ({resolved}) | {seq_len} | {batch} | {threads} | {med['eager']:.2f} | "
                          f"{med['fused']:.2f} | {med['eager'] / med['fused']:.2f}x | {floor:.2f} | "
                          f"{med['fused'] / floor:.2f}x |", flush=True)
    print(f"\nmedians of {args.repeats} interleaved repeats of {args.steps} steps; floor at the sgemm rate measured "
          "in the same repeats with the same thread count.")


if __name__ == "__main__":
    main()
