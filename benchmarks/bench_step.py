"""Training-step throughput of irnn's engines against nn.RNN eager and the prototype's pipeline.

Prints one Markdown table: median ms per training step (forward, backward, clip,
optimiser), samples/s, model-steps/s, peak memory, and the ratio against
``nn.RNN`` eager measured in the same process. Engines are interleaved over
repeats so that a noisy shared machine affects all of them alike.

    python benchmarks/bench_step.py                  # CPU, T=150 and 400, 1 and 2 threads
    python benchmarks/bench_step.py --device cuda    # on a GPU
"""
from __future__ import annotations

import argparse
import platform
import resource
import statistics
import time

import torch

from irnn.config import Config
from irnn.engine import make_train_step, resolve_engine
from irnn.models import build_model
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
        float(loss)  # Lightning logs the loss every step: a host sync

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seq-len", type=int, nargs="+", default=[150, 400])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--ensemble", type=int, nargs="*", default=[16], help="ensemble sizes to time (if available)")
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    device = torch.device(args.device)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads available, "
          f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    rows = []
    for threads in args.threads if device.type == "cpu" else [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        for T in args.seq_len:
            fns = {}
            fns["nn.RNN eager"], _ = make_library_step("torch", "irnn", T, args.batch, device)
            fns["prototype pipeline"] = make_prototype_step(T, args.batch, device)
            fast, resolved = make_library_step("auto", "irnn", T, args.batch, device)
            fns[f"irnn default ({resolved})"] = fast
            fns["nn.LSTM eager"], _ = make_library_step("torch", "lstm", T, args.batch, device)
            ensembles = {}
            for n in args.ensemble:
                try:
                    from irnn.engine.ensemble import make_benchmark_step
                except ImportError:
                    break
                ensembles[f"ensemble N={n} ({resolved})"] = n
                fns[f"ensemble N={n} ({resolved})"] = make_benchmark_step(n, T, args.batch, device)
                if device.type == "cuda" and n > 16:
                    continue  # one CUDA graph per model: hundreds of captures would take minutes
                # the same n models, seeds and data, one step each in turn: what the ensemble must beat
                ensembles[f"{n} models one after another ({resolved})"] = n
                fns[f"{n} models one after another ({resolved})"] = make_benchmark_step(n, T, args.batch, device,
                                                                                        sequential=True)
            med = measure(fns, device, args.repeats, args.steps, warmup=3)
            base = med["nn.RNN eager"]
            for name, ms in med.items():
                n = ensembles.get(name, 1)
                rows.append((name, T, threads, ms, args.batch * n * 1000 / ms, n * 1000 / ms, base / ms * n))
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print()
    print("| engine | T | threads | ms/step | samples/s | model-steps/s | speed-up vs nn.RNN eager (per model) |")
    print("|---|---|---|---|---|---|---|")
    for name, T, th, ms, sps, msps, ratio in rows:
        print(f"| {name} | {T} | {th} | {ms:.2f} | {sps:,.0f} | {msps:,.0f} | {ratio:.2f}x |")
    mem = (f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB" if device.type == "cuda"
           else f"process peak RSS {peak / 1024:.0f} MiB")
    print(f"\n{mem}; medians of {args.repeats} interleaved repeats of {args.steps} steps, batch {args.batch}, hidden 100.")
    by_key = {(name.split(" (")[0], T, th): ms for name, T, th, ms, *_ in rows}
    for n in args.ensemble:
        for (name, T, th), ms in by_key.items():
            alone = by_key.get((f"{n} models one after another", T, th))
            if name == f"ensemble N={n}" and alone:
                print(f"ensemble N={n}, T={T}, {th} thread(s): {alone / ms:.2f}x the throughput of the same {n} models "
                      f"trained one after another")


if __name__ == "__main__":
    main()
