"""Training-step throughput of irnn's engines against nn.RNN/LSTM/GRU eager and the prototype's pipeline.

Prints one Markdown table: median ms per training step (forward, backward, clip,
optimiser), samples/s, model-steps/s, the peak memory of each engine, and the
ratio against ``nn.RNN`` eager measured in the same process; then the LSTM's and GRU's default engine
against ``nn.LSTM`` / ``nn.GRU`` eager. Engines are interleaved over
repeats so that a noisy shared machine affects all of them alike.

    python benchmarks/bench_step.py                  # CPU, T=150 and 400, 1 and 2 threads
    python benchmarks/bench_step.py --batch 32       # the same at batch 32
    python benchmarks/bench_step.py --device cuda    # on a GPU
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from irnn.config import Config
from irnn.engine import make_train_step, resolve_engine
from irnn.engine.ensemble import StackedStep
from irnn.models import RecurrentModel, build_model
from irnn.tasks import make_adding
from irnn.train.optim import make_optimizer


class PerSampleAdding(torch.utils.data.Dataset):
    """The earlier prototype's data path: one Python-generated sample per __getitem__."""

    def __init__(self, n: int, seq_len: int):
        self.n, self.seq_len = n, seq_len

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        import numpy as np

        values = np.random.uniform(0, 1, self.seq_len)
        marker = np.zeros(self.seq_len)
        a, b = np.random.choice(self.seq_len, 2, replace=False)
        marker[[a, b]] = 1
        x = torch.tensor(np.stack([values, marker], 1), dtype=torch.float32)
        return x, torch.tensor([values[a] + values[b]], dtype=torch.float32)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_library_step(engine: str, model_kind: str, seq_len: int, batch: int, device: torch.device):
    """A timed callable doing one full training step with the library's engine."""
    cfg = Config(model=model_kind, seq_len=seq_len, batch_size=batch, engine=engine, optimizer="adam", lr=1e-4)
    task = make_adding(seq_len, train_size=batch * 64, test_size=16, seed=0, device=device)
    torch.manual_seed(0)
    model = build_model(cfg, task.input_size, task.output_size).to(device)
    resolved = resolve_engine(engine, model, device, cfg.optimizer)
    opt = make_optimizer(cfg, model.parameters(), capturable=resolved == "cuda-graph")
    example = task.batch(0, batch, 0)
    step = make_train_step(model, resolved, task.loss_fn, opt, cfg.clip_norm, example)
    counter = [0]

    def run():
        x, y = task.batch(counter[0], batch, 0)
        counter[0] += 1
        step(x, y)

    return run, resolved


def make_prototype_step(seq_len: int, batch: int, device: torch.device):
    """Per-sample Dataset + DataLoader + a Lightning-style loop around nn.RNN."""
    cfg = Config(model="irnn", seq_len=seq_len, init_scale=0.01)
    model = build_model(cfg, 2, 1).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    loader = torch.utils.data.DataLoader(PerSampleAdding(10**9, seq_len), batch_size=batch, num_workers=0)
    it = iter(loader)

    def run():
        x, y = next(it)
        x, y = x.to(device), y.to(device)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss.item()  # Lightning logs the loss every step: a host sync

    return run


def measure(fns: dict, device, repeats: int, steps: int, warmup: int) -> dict[str, float]:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():  # interleaved: the same noise hits every engine
            _sync(device)
            t = time.perf_counter()
            for _ in range(steps):
                fn()
            _sync(device)
            times[name].append((time.perf_counter() - t) / steps * 1000)
    return {k: statistics.median(v) for k, v in times.items()}


def engine_builders(seq_len: int, batch: int, device: torch.device, ensembles: list[int]) -> dict:
    """``{row name: (build, models per step)}``; ``build()`` returns the callable doing one step."""
    resolved = resolve_engine("auto", build_model(Config(model="irnn"), 2, 1), device)
    rows = {
        "nn.RNN eager": (lambda: make_library_step("torch", "irnn", seq_len, batch, device)[0], 1),
        "prototype pipeline": (lambda: make_prototype_step(seq_len, batch, device), 1),
        f"irnn default ({resolved})": (lambda: make_library_step("auto", "irnn", seq_len, batch, device)[0], 1),
    }
    tanh = resolve_engine("auto", build_model(Config(model="rnn-tanh"), 2, 1), device)
    rows["nn.RNN tanh eager"] = (lambda: make_library_step("torch", "rnn-tanh", seq_len, batch, device)[0], 1)
    rows[f"RNN-TANH default ({tanh})"] = (lambda: make_library_step("auto", "rnn-tanh", seq_len, batch, device)[0], 1)
    for kind, module in (("lstm", "nn.LSTM"), ("gru", "nn.GRU")):  # the gated baselines: eager and irnn's default
        gated = resolve_engine("auto", build_model(Config(model=kind), 2, 1), device)
        rows[f"{module} eager"] = (lambda kind=kind: make_library_step("torch", kind, seq_len, batch, device)[0], 1)
        rows[f"{kind.upper()} default ({gated})"] = (
            lambda kind=kind: make_library_step("auto", kind, seq_len, batch, device)[0], 1)
    for n in ensembles:
        rows[f"ensemble N={n} ({resolved})"] = (lambda n=n: make_benchmark_step(n, seq_len, batch, device), n)
        if device.type == "cuda" and n > 16:
            continue  # one CUDA graph per model: hundreds of captures would take minutes
        # the same n models, seeds and data, one step each in turn: what the ensemble must beat
        rows[f"{n} models one after another ({resolved})"] = (
            lambda n=n: make_benchmark_step(n, seq_len, batch, device, sequential=True), n)
    return rows


def make_benchmark_step(n: int, seq_len: int, batch: int, device: torch.device, *, sequential: bool = False):
    """A callable doing one stacked step of n IRNNs (for ``benchmarks/bench_step.py``).

    With ``sequential``, the same n models (same seeds, optimisers and data) take one step each, one
    after another, with the default engine: the baseline an ensemble is meant to beat.
    """
    models, opts = [], []
    for k in range(n):
        torch.manual_seed(k)
        m = RecurrentModel("irnn", 2, 100, 1).to(device)
        models.append(m)
        opts.append(torch.optim.Adam(m.parameters(), lr=1e-4, fused=device.type == "cpu" or None))
    task = make_adding(seq_len, train_size=batch * 64, test_size=16, seed=0, device=device)
    counter = [0]
    if sequential:
        example = task.batch(0, batch, 0)
        steps = [make_train_step(m, resolve_engine("auto", m, device), task.loss_fn, o, 1.0, example)
                 for m, o in zip(models, opts)]

        def run_one_by_one():
            for k, one in enumerate(steps):
                one(*task.batch(counter[0] + k, batch, 0))
            counter[0] += 1

        return run_one_by_one
    step = StackedStep(task.loss_fn)

    def run():
        xs, ys = zip(*(task.batch(counter[0] + k, batch, 0) for k in range(n)))
        counter[0] += 1
        step(models, opts, [1.0] * n, torch.stack(xs), torch.stack(ys))

    return run


def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def build_with_peak(build, device: torch.device, steps: int = 3):
    """``(step, peak MiB)``: builds an engine, runs ``steps`` training steps, and measures the most memory
    that added: CUDA bytes allocated on a GPU; on a Linux CPU resident memory (the peak, VmHWM, reset
    first through /proc/self/clear_refs; freed heap is handed back first so it cannot hide new pages).
    The peak is None where neither counter exists."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        try:
            ctypes.CDLL(None).malloc_trim(0)  # glibc; elsewhere freed heap may hide some new pages
        except (OSError, AttributeError, TypeError):
            pass
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak resident set size to the current one
            base = _proc_kib("VmRSS")
        except (OSError, StopIteration):
            base = None
    step = build()
    for _ in range(steps):
        step()
    _sync(device)
    if device.type == "cuda":
        return step, (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return step, None if base is None else max(0, _proc_kib("VmHWM") - base) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seq-len", type=int, nargs="+", default=[150, 400])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--ensemble", type=int, nargs="*", default=[16], help="ensemble sizes to time")
    ap.add_argument("--only", nargs="+", metavar="WORD",
                    help="time only the rows whose name contains one of these words (nn.RNN eager is always kept)")
    ap.add_argument("--peak-of", metavar="ROW", help=argparse.SUPPRESS)  # child: print one row's peak memory
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    device = torch.device(args.device)
    if args.peak_of:
        torch.set_num_threads(args.threads[0])
        # First the same row at T=2: libraries, thread pools and kernels load once per process, not per engine.
        warm = engine_builders(2, args.batch, device, args.ensemble)[args.peak_of][0]()
        for _ in range(2):
            warm()
        del warm
        build, _ = engine_builders(args.seq_len[0], args.batch, device, args.ensemble)[args.peak_of]
        print(build_with_peak(build, device)[1])
        return
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads available, "
          f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    rows = []
    for threads in args.threads if device.type == "cpu" else [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        for T in args.seq_len:
            builders = engine_builders(T, args.batch, device, args.ensemble)
            if args.only:
                builders = {k: v for k, v in builders.items()
                            if k == "nn.RNN eager" or any(w in k for w in args.only)}
            fns, peaks = {}, {}
            for name, (build, _) in builders.items():
                if device.type == "cuda":  # memory counters that reset: measured here, with the warm-up
                    fns[name], peaks[name] = build_with_peak(build, device)
                else:  # resident memory is only clean in a fresh process: one per row, after the timing
                    fns[name] = build()
            med = measure(fns, device, args.repeats, args.steps, warmup=3)
            del fns
            base = med["nn.RNN eager"]
            for name, ms in med.items():
                n = builders[name][1]
                peak = peaks[name] if device.type == "cuda" else _child_peak(name, T, threads, args)
                rows.append((name, T, threads, ms, args.batch * n * 1000 / ms, n * 1000 / ms, peak, base / ms * n))
    print()
    memory = "peak GPU MiB" if device.type == "cuda" else "peak RSS MiB"
    print(f"| engine | T | threads | ms/step | samples/s | model-steps/s | {memory} | speed-up vs nn.RNN eager (per model) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, T, th, ms, sps, msps, peak, ratio in rows:
        mib = "n/a" if peak is None else f"{peak:.1f}"
        print(f"| {name} | {T} | {th} | {ms:.2f} | {sps:,.0f} | {msps:,.0f} | {mib} | {ratio:.2f}x |")
    print(f"\nmedians of {args.repeats} interleaved repeats of {args.steps} steps, batch {args.batch}, hidden 100; "
          f"{memory}: the most memory building the engine and 3 training steps added"
          + ("" if device.type == "cuda" else ", each row in a fresh process") + ".")
    by_key = {(name.split(" (")[0], T, th): ms for name, T, th, ms, *_ in rows}
    for kind, module in (("RNN-TANH", "nn.RNN tanh"), ("LSTM", "nn.LSTM"), ("GRU", "nn.GRU")):
        for (name, T, th), ms in by_key.items():
            eager = by_key.get((f"{module} eager", T, th))
            if name == f"{kind} default" and eager:
                print(f"{kind} default, T={T}, {th} thread(s), batch {args.batch}: {eager / ms:.2f}x the speed of "
                      f"{module} eager")
    for n in args.ensemble:
        for (name, T, th), ms in by_key.items():
            alone = by_key.get((f"{n} models one after another", T, th))
            if name == f"ensemble N={n}" and alone:
                print(f"ensemble N={n}, T={T}, {th} thread(s): {alone / ms:.2f}x the throughput of the same {n} models "
                      f"trained one after another")


def _child_peak(name: str, seq_len: int, threads: int, args) -> float | None:
    """One row's peak memory, measured in a fresh process; None (printed n/a) where it cannot be."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        return None
    cmd = [sys.executable, __file__, "--peak-of", name, "--seq-len", str(seq_len), "--threads", str(threads),
           "--batch", str(args.batch), "--device", args.device, "--ensemble", *map(str, args.ensemble)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(out.stderr.strip()[-300:])
        value = out.stdout.strip().splitlines()[-1]
        return None if value == "None" else float(value)
    except (subprocess.TimeoutExpired, RuntimeError, ValueError, IndexError) as exc:  # keep the timings
        print(f"peak memory of {name!r} (T={seq_len}) not measured: {exc}", file=sys.stderr)
        return None


if __name__ == "__main__":
    main()
