"""What thread-count-independent results cost: the fused engine's fixed row groups against a split that
follows the thread count (the engine's rule before 2026-12-02), same process, interleaved, medians.

    python benchmarks/bench_threads.py                 # T=150, B=16 and 32, 1 and 2 threads

The old rule split each model's batch rows into min(threads, B // 4, work // 2M) slices, so dW_hh (a sum
of per-slice partials) followed the thread count; the fixed rule (``fused._groups``) depends on the
shapes alone. Both run the same kernels, so the ratio is the whole cost of the fixed split.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from irnn.engine import fused, make_train_step
from irnn.models import RecurrentModel
from irnn.tasks import make_adding


def thread_following(x: torch.Tensor, w_hh: torch.Tensor) -> int:
    threads = torch.get_num_threads()
    n_models, batch = (x.shape[0], x.shape[1]) if x.dim() == 4 else (1, x.shape[0])
    if threads <= 1 or n_models >= threads:
        return 1
    work = batch * x.shape[-2] * w_hh.shape[-1] ** 2
    return max(1, min(-(-threads // n_models), batch // 4, work // fused._MIN_SLICE_WORK))


def make_step(seq_len: int, batch: int):
    torch.manual_seed(0)
    model = RecurrentModel("irnn", 2, 100, 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    task = make_adding(seq_len, train_size=batch * 64, test_size=16, seed=0)
    step = make_train_step(model, "fused", task.loss_fn, opt, 1.0, task.batch(0, batch, 0))
    batches = [task.batch(i, batch, 0) for i in range(64)]
    counter = [0]

    def run():
        step(*batches[counter[0] % 64])
        counter[0] += 1

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=150)
    ap.add_argument("--batch", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    fixed_rule = fused._groups
    print(f"| T | B | threads | groups fixed / following | fixed ms | following ms | fixed / following |")
    print("|---|---|---|---|---|---|---|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch in args.batch:
            runs = {"fixed": make_step(args.seq_len, batch), "following": make_step(args.seq_len, batch)}
            rules = {"fixed": fixed_rule, "following": thread_following}
            times = {k: [] for k in runs}
            for name in runs:  # warm-up
                fused._groups = rules[name]
                for _ in range(5):
                    runs[name]()
            for _ in range(args.repeats):
                for name, run in runs.items():
                    fused._groups = rules[name]
                    t0 = time.perf_counter()
                    for _ in range(args.steps):
                        run()
                    times[name].append((time.perf_counter() - t0) / args.steps * 1e3)
            fused._groups = fixed_rule
            x, w = torch.empty(batch, args.seq_len, 2), torch.empty(100, 100)
            ratios = [a / b for a, b in zip(times["fixed"], times["following"])]
            fx, fo = statistics.median(times["fixed"]), statistics.median(times["following"])
            print(f"| {args.seq_len} | {batch} | {threads} | {fixed_rule(x, w)} / {thread_following(x, w)} | "
                  f"{fx:.2f} | {fo:.2f} | {statistics.median(ratios):.3f} "
                  f"({min(ratios):.2f}-{max(ratios):.2f}) |", flush=True)


if __name__ == "__main__":
    main()
