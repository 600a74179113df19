"""Milliseconds per training step of every registered model on one task, as ``irnn train`` runs it
(engine ``auto``, Adam, clip 1), interleaved repeats in one process, medians and the ratio to the IRNN.

    python benchmarks/bench_models.py --task adding --seq-len 200 --batch 32 --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from irnn import registry
from irnn.config import from_dict
from irnn.engine import make_train_step, resolve_engine
from irnn.models import build_model
from irnn.tasks import make_task
from irnn.train.optim import constrain_after_each_step, make_optimizer


def make_step(name: str, task_name: str, seq_len: int, batch: int):
    cfg = from_dict(dict(model=name, task=task_name, seq_len=seq_len, batch_size=batch, train_size=batch * 4,
                         test_size=8, data_source="digits"))
    torch.manual_seed(0)
    task = make_task(cfg)
    model = build_model(cfg, task.input_size, task.output_size, per_step=task.per_step)
    engine = resolve_engine("auto", model, torch.device("cpu"), cfg.optimizer)
    opt = make_optimizer(cfg, model.parameters())
    constrain_after_each_step(model, opt)
    batches = [task.batch(i, batch, 0) for i in range(4)]
    step = make_train_step(model, engine, task.loss_fn, opt, cfg.clip_norm, batches[0])
    return engine, lambda i: step(*batches[i % 4])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="adding")
    ap.add_argument("--seq-len", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--models", nargs="+", default=None, help="default: every registered model")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    names = args.models or list(registry.model_names())
    steps = {n: make_step(n, args.task, args.seq_len, args.batch) for n in names}
    for _, fn in steps.values():  # warm up (first calls build caches)
        fn(0), fn(1)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.repeats):
        for n in names:
            t = time.perf_counter()
            for i in range(args.steps):
                fn = steps[n][1]
                fn(i)
            times[n].append((time.perf_counter() - t) / args.steps * 1e3)
    base = statistics.median(times["irnn"]) if "irnn" in times else None
    print(f"task {args.task}, T={args.seq_len}, batch {args.batch}, {args.threads} thread(s), "
          f"torch {torch.__version__}")
    print("| model | engine | ms/step | vs irnn |\n|---|---|---|---|")
    for n in names:
        ms = statistics.median(times[n])
        print(f"| {n} | {steps[n][0]} | {ms:.2f} | {ms / base:.2f}x |" if base else f"| {n} | {steps[n][0]} | {ms:.2f} | |")
    print(f"\nmedians of {args.repeats} interleaved repeats of {args.steps} steps")


if __name__ == "__main__":
    main()
