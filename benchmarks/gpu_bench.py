"""GPU engines on one device: gradient error against float64, then ms per full training step.

    PYTHONPATH=src python3 benchmarks/gpu_bench.py --out devout        # on a CUDA machine
    PYTHONPATH=src python3 benchmarks/gpu_bench.py --smoke --out /tmp/x  # tiny shapes, runs on CPU too

A full step is forward, backward, clip by global norm (per model for ensembles), Adam; batch 16,
hidden 100, input 2, fp32. Every timing row quotes a ratio against the eager ``nn.RNN`` (cuDNN)
step measured in the same run. Each accuracy figure is ``||g - g64|| / ||g64||`` over all
parameter gradients, g64 computed in float64 from the same parameters on fresh random inputs.
Each part is wrapped: one that fails prints its error and the rest still runs. Output: a
Markdown table on stdout and in ``OUT/gpu_bench.md``, the rows in ``OUT/gpu_bench.json``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from irnn.engine import cuda_graph as cg
from irnn.models import RecurrentModel
from irnn.tasks.adding import generate

FP32_BAR = 1e-4  # PERF_NOTES: an fp32-grade path keeps the gradient error at or below this


@dataclass
class Sizes:
    batch: int
    hidden: int
    seq_lens: tuple
    ensembles: tuple
    accuracy_ensemble: int


FULL = Sizes(batch=16, hidden=100, seq_lens=(150, 400), ensembles=(64, 512, 2048), accuracy_ensemble=64)
SMOKE = Sizes(batch=3, hidden=7, seq_lens=(5, 6), ensembles=(2, 3), accuracy_ensemble=2)


def log(*args) -> None:
    print(*args, flush=True)


class Bench:
    def __init__(self, args):
        self.args = args
        self.sizes = SMOKE if args.smoke else FULL
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.cuda = self.device.type == "cuda"
        self.deadline = time.perf_counter() + args.budget_s
        self.accuracy: list[dict] = []
        self.timing: list[dict] = []
        self.errors: list[str] = []
        self.baseline_ms: dict[int, float] = {}
        self.info: dict = {}

    # --- plumbing ----------------------------------------------------------------------------
    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def guarded(self, name: str, fn, *a, need_s: float = 5.0, **k):
        """Run one part; on failure (or no time left) record why and carry on."""
        if self.left() < need_s:
            msg = f"{name}: skipped, {self.left():.0f} s of the time budget left"
            log("  " + msg)
            self.errors.append(msg)
            return None
        t0 = time.perf_counter()
        try:
            out = fn(*a, **k)
            log(f"  [{time.perf_counter() - t0:5.1f} s] {name}")
            return out
        except Exception as e:  # noqa: BLE001 - report and keep going
            msg = f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log("  FAILED " + msg)
            traceback.print_exc(limit=4, file=sys.stdout)
            self.errors.append(msg)
            return None
        finally:
            if self.cuda:
                try:
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                except Exception:  # noqa: BLE001 - a broken context shows up in the next part
                    pass
            self.write()  # after every part, so that a run cut short by its time limit still reports

    def write(self) -> None:
        out = Path(self.args.out)
        (out / "gpu_bench.md").write_text(self.table())
        (out / "gpu_bench.json").write_text(json.dumps(
            {"accuracy": self.accuracy, "timing": self.timing, "errors": self.errors, "info": self.info}, indent=1))

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time_ms(self, step, x, y) -> float:
        """Median ms per call over repeats, after warm-up; CUDA events on a GPU."""
        for _ in range(3):
            step(x, y)
        self.sync()
        t0 = time.perf_counter()
        step(x, y)
        self.sync()
        once = max(time.perf_counter() - t0, 1e-5)
        reps = self.args.repeats
        n = int(max(2, min(500, self.args.min_time_s / reps / once)))
        times = []
        for _ in range(reps):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(n):
                    step(x, y)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / n)
            else:
                t0 = time.perf_counter()
                for _ in range(n):
                    step(x, y)
                times.append((time.perf_counter() - t0) * 1e3 / n)
        return statistics.median(times)

    def data(self, n_models, seq_len, seed):
        """Adding-problem batches: [B, T, 2] and [B, 1], or [N, B, T, 2] and [N, B, 1] for N models."""
        g = torch.Generator().manual_seed(seed)
        B = self.sizes.batch
        x, y = generate(B * max(n_models, 1), seq_len, generator=g)
        if n_models:
            x, y = x.view(n_models, B, seq_len, 2), y.view(n_models, B, 1)
        return x.to(self.device), y.to(self.device)

    def model(self, kind, seed=0):
        """The model at its initialisation, nudged off it so that no gradient is trivially exact."""
        torch.manual_seed(seed)
        m = RecurrentModel(kind, 2, self.sizes.hidden, 1).to(self.device)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01 * torch.randn_like(p) / p.shape[-1] ** 0.5)
        return m

    def step_for(self, forward, params, x, y, graphed, loss_fn=F.mse_loss, clip_fn=None, allow_tf32=False,
                 fused=True):
        """A training step over ``params`` with Adam: a GraphedStep, or the eager step under the same TF32 setting."""
        opt = torch.optim.Adam(params, lr=1e-3)
        if graphed:
            return cg.GraphedStep(forward, loss_fn, params, opt, 1.0, x, y, allow_tf32=allow_tf32, clip_fn=clip_fn,
                                  fused_optimizer=fused)

        def eager(xb, yb):
            with cg.fp32_matmuls(allow_tf32):
                opt.zero_grad(set_to_none=True)
                return cg.train_step(forward, loss_fn, params, opt, 1.0, xb, yb, clip_fn)
        return eager

    # --- accuracy -----------------------------------------------------------------------------
    def record_error(self, engine, seq_len, err, n_models=1, bar=True, note=""):
        ok = "yes" if err <= FP32_BAR else "NO"
        row = dict(engine=engine, T=seq_len, N=n_models, grad_rel_err=err, fp32_grade=ok if bar else "-", note=note)
        self.accuracy.append(row)
        log(f"    {engine:<52} T={seq_len:<4} N={n_models:<5} grad rel. err. {err:.2e}"
            + (f"  (fp32-grade: {ok})" if bar else ""))

    def model_grads_64(self, model, x, y):
        ref = copy.deepcopy(model).double().cpu()
        loss = F.mse_loss(ref(x.double().cpu()), y.double().cpu())
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(ref.parameters()))])

    @staticmethod
    def rel(g, g64):
        g = g.detach().double().cpu()
        return ((g - g64).norm() / g64.norm()).item()

    def check_eager(self, name, kind, seq_len, forward_of, allow_tf32=False, bar=True, note=""):
        model = self.model(kind)
        x, y = self.data(0, seq_len, seed=100 + seq_len)
        g64 = self.model_grads_64(model, x, y)
        with cg.fp32_matmuls(allow_tf32):
            loss = F.mse_loss(forward_of(model)(x), y)
            g = torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))])
        self.record_error(name, seq_len, self.rel(g, g64), bar=bar, note=note)

    def check_graphed(self, name, kind, seq_len, forward_of):
        """Gradients the captured step leaves in .grad (clip off: threshold 1e9) against float64."""
        model = self.model(kind)
        x0, y0 = self.data(0, seq_len, seed=7)
        x, y = self.data(0, seq_len, seed=200 + seq_len)
        params = list(model.parameters())
        step = cg.GraphedStep(forward_of(model), F.mse_loss, params, torch.optim.Adam(params, lr=1e-3), 1e9, x0, y0)
        g64 = self.model_grads_64(model, x, y)  # the parameters the replay will differentiate at
        step(x, y)
        g = torch.cat([p.grad.flatten() for p in params])
        self.record_error(name, seq_len, self.rel(g, g64))

    def check_ensemble(self, precision, seq_len, n_models):
        ens = Ensemble(n_models, self.sizes.hidden, self.device, precision=precision)
        x, y = self.data(n_models, seq_len, seed=300)
        g = torch.cat([t.flatten() for t in torch.autograd.grad(ens.loss(ens(x), y), ens.params())])
        ref = ens.double_copy()
        loss64 = ref.loss(ref.reference_forward(x.double()), y.double())
        g64 = torch.cat([t.flatten() for t in torch.autograd.grad(loss64, ref.params())]).cpu()
        self.record_error(f"Triton ensemble, {precision}", seq_len, self.rel(g, g64), n_models=n_models,
                          bar=precision != "tf32", note="" if precision != "tf32" else "fast mode, not fp32-grade")

    def accuracy_part(self):
        from irnn.engine import triton_rnn as tr
        have_triton = tr.available()
        log(f"triton available: {have_triton}")
        for T in self.sizes.seq_lens:
            self.guarded(f"accuracy cuDNN fp32 T={T}", self.check_eager, "nn.RNN relu, cuDNN fp32 (eager)", "irnn", T,
                         lambda m: m)
            self.guarded(f"accuracy cuDNN TF32 T={T}", self.check_eager, "nn.RNN relu, cuDNN TF32 (eager)", "irnn", T,
                         lambda m: m, allow_tf32=True, bar=False, note="PyTorch's default cuDNN setting")
            self.guarded(f"accuracy graphed cuDNN T={T}", self.check_graphed, "nn.RNN relu, CUDA graph, fp32", "irnn", T,
                         lambda m: m)
            self.guarded(f"accuracy graphed LSTM T={T}", self.check_graphed, "nn.LSTM, CUDA graph, fp32", "lstm", T,
                         lambda m: m)
            if not have_triton:
                continue
            for prec in tr.PRECISIONS:
                self.guarded(f"accuracy Triton {prec} T={T}", self.check_eager, f"Triton layer, {prec}", "irnn", T,
                             lambda m, p=prec: tr.model_forward(m, p), bar=prec != "tf32",
                             note="fast mode, not fp32-grade" if prec == "tf32" else "")
            self.guarded(f"accuracy Triton tf32x3 untransposed T={T}", self.check_eager,
                         "Triton layer, tf32x3, state as [B, H]", "irnn", T,
                         lambda m: tr.model_forward(m, "tf32x3", transposed=False))
            self.guarded(f"accuracy Triton tanh T={T}", self.check_eager, "Triton layer, tanh, tf32x3", "rnn-tanh", T,
                         lambda m: tr.model_forward(m, "tf32x3"))
            self.guarded(f"accuracy graphed Triton T={T}", self.check_graphed, "Triton layer, CUDA graph, tf32x3",
                         "irnn", T, lambda m: tr.model_forward(m, "tf32x3"))
        if have_triton:
            T = self.sizes.seq_lens[0]
            for prec in ("tf32x3", "tf32"):
                self.guarded(f"accuracy ensemble {prec}", self.check_ensemble, prec, T, self.sizes.accuracy_ensemble)

    # --- timing -------------------------------------------------------------------------------
    def record_time(self, engine, seq_len, ms, n_models=1, note=""):
        if not self.cuda and "CUDA graph" in engine:
            note = (note + "; " if note else "") + "smoke run: stepped eagerly"
        base = self.baseline_ms.get(seq_len)
        row = dict(engine=engine, T=seq_len, N=n_models, ms_per_step=ms, model_steps_per_s=n_models * 1e3 / ms,
                   speedup_vs_eager_cudnn=(base * n_models / ms) if base else None, note=note)
        self.timing.append(row)
        ratio = f"{row['speedup_vs_eager_cudnn']:7.1f}x" if base else "       -"
        log(f"    {engine:<52} T={seq_len:<4} N={n_models:<5} {ms:9.3f} ms/step {row['model_steps_per_s']:12,.0f} "
            f"model-steps/s {ratio}")

    def time_model(self, name, kind, seq_len, forward_of=lambda m: m, graphed=True, allow_tf32=False, fused=True,
                   baseline=False, note=""):
        model = self.model(kind)
        x, y = self.data(0, seq_len, seed=1)
        step = self.step_for(forward_of(model), list(model.parameters()), x, y, graphed, allow_tf32=allow_tf32,
                             fused=fused)
        ms = self.time_ms(step, x, y)
        if baseline:
            self.baseline_ms[seq_len] = ms
        self.record_time(name, seq_len, ms, note=note)

    def time_ensemble(self, n_models, seq_len, precision="tf32x3", graphed=True, note="", **launch):
        ens = Ensemble(n_models, self.sizes.hidden, self.device, precision=precision, **launch)
        x, y = self.data(n_models, seq_len, seed=2)
        step = self.step_for(ens, ens.params(), x, y, graphed, loss_fn=ens.loss, clip_fn=ens.clip_)
        ms = self.time_ms(step, x, y)
        extra = "".join(f", {k}={v}" for k, v in launch.items())
        self.record_time(f"Triton ensemble, {precision}{extra}{'' if graphed else ', eager'}", seq_len, ms,
                         n_models=n_models, note=note)

    def timing_part(self):
        """Most important rows first: a part that runs out of the time budget is skipped, not cut."""
        from irnn.engine import triton_rnn as tr
        have_triton = tr.available()
        graphed = self.cuda  # on CPU (--smoke) the graphed rows run eagerly, to exercise the code
        T0, T_last = self.sizes.seq_lens[0], self.sizes.seq_lens[-1]
        for T in self.sizes.seq_lens:
            self.guarded(f"time eager cuDNN T={T}", self.time_model, "nn.RNN relu, eager (cuDNN), fp32", "irnn", T,
                         graphed=False, baseline=True, note="baseline")
            self.guarded(f"time graphed cuDNN T={T}", self.time_model, "nn.RNN relu, CUDA graph (cuDNN), fp32", "irnn",
                         T, graphed=graphed)
            if have_triton:
                self.guarded(f"time graphed Triton T={T}", self.time_model, "Triton layer, CUDA graph, tf32x3", "irnn", T,
                             lambda m: tr.model_forward(m, "tf32x3"), graphed=graphed,
                             note="target <= 0.136 ms at T=150" if T == T0 else "")
        if have_triton:
            for n in self.sizes.ensembles:
                self.guarded(f"time ensemble N={n} T={T0}", self.time_ensemble, n, T0, graphed=graphed,
                             note="target >= 100,000 model-steps/s" if n == self.sizes.ensembles[-1] else "",
                             need_s=15)
        for T in self.sizes.seq_lens:
            self.guarded(f"time eager LSTM T={T}", self.time_model, "nn.LSTM, eager (cuDNN), fp32", "lstm", T,
                         graphed=False)
            self.guarded(f"time graphed LSTM T={T}", self.time_model, "nn.LSTM, CUDA graph (cuDNN), fp32", "lstm", T,
                         graphed=graphed)
        self.guarded(f"time graphed cuDNN TF32 T={T0}", self.time_model, "nn.RNN relu, CUDA graph (cuDNN), TF32",
                     "irnn", T0, graphed=graphed, allow_tf32=True, note="not fp32-grade")
        self.guarded(f"time graphed cuDNN foreach Adam T={T0}", self.time_model,
                     "nn.RNN relu, CUDA graph (cuDNN), fp32, foreach Adam", "irnn", T0, graphed=graphed, fused=False)
        if not have_triton:
            return
        n = self.sizes.ensembles[-1]
        self.guarded(f"time ensemble N={n} tf32", self.time_ensemble, n, T0, "tf32", graphed=graphed,
                     note="not fp32-grade", need_s=15)
        self.guarded(f"time ensemble N={n} untransposed", self.time_ensemble, n, T0, graphed=graphed,
                     transposed=False, need_s=15)
        for name, forward_of in [
            ("Triton layer, CUDA graph, tf32x3, state [B, H]", lambda m: tr.model_forward(m, "tf32x3", transposed=False)),
            ("Triton layer, CUDA graph, tf32x3, 4 warps", lambda m: tr.model_forward(m, "tf32x3", num_warps=4)),
            ("Triton layer, CUDA graph, tf32x3-native", lambda m: tr.model_forward(m, "tf32x3-native")),
            ("Triton layer, CUDA graph, ieee", lambda m: tr.model_forward(m, "ieee")),
            ("Triton layer, CUDA graph, tf32", lambda m: tr.model_forward(m, "tf32")),
        ]:
            self.guarded(f"time {name} T={T0}", self.time_model, name, "irnn", T0, forward_of, graphed=graphed,
                         note="not fp32-grade" if name.endswith(", tf32") else "")
        self.guarded(f"time ensemble N={n} tf32x3-native", self.time_ensemble, n, T0, "tf32x3-native",
                     graphed=graphed, need_s=15)
        self.guarded(f"time ensemble N={n} T={T_last}", self.time_ensemble, n, T_last, graphed=graphed, need_s=20)

    def kernel_report(self):
        """Registers, spills and shared memory of every Triton kernel compiled in this run."""
        from irnn.engine import triton_rnn as tr
        for kernel in tr._KERNELS.get(False, ()):
            for cache in kernel.device_caches.values():
                for key, k in cache[0].items():
                    md = k.metadata
                    log(f"    {md.name}: num_warps={md.num_warps} num_stages={getattr(md, 'num_stages', '?')} "
                        f"regs={getattr(k, 'n_regs', '?')} spills={getattr(k, 'n_spills', '?')} "
                        f"shared={md.shared} B; key {str(key)[-160:]}")

    # --- report -------------------------------------------------------------------------------
    def table(self) -> str:
        lines = ["## Gradient error against float64 (fresh random adding-problem inputs)", "",
                 "| engine | T | N | grad rel. err. | fp32-grade (<= 1e-4) | note |", "|---|---|---|---|---|---|"]
        for r in self.accuracy:
            lines.append(f"| {r['engine']} | {r['T']} | {r['N']} | {r['grad_rel_err']:.2e} | {r['fp32_grade']} | "
                         f"{r['note']} |")
        lines += ["", "## ms per full training step (forward, backward, clip, Adam; B=16, H=100), median", "",
                  "| engine | T | N | ms/step | model-steps/s | vs eager cuDNN | note |",
                  "|---|---|---|---|---|---|---|"]
        for r in self.timing:
            ratio = f"{r['speedup_vs_eager_cudnn']:.1f}x" if r["speedup_vs_eager_cudnn"] else "-"
            lines.append(f"| {r['engine']} | {r['T']} | {r['N']} | {r['ms_per_step']:.3f} | "
                         f"{r['model_steps_per_s']:,.0f} | {ratio} | {r['note']} |")
        if self.errors:
            lines += ["", "## Parts that failed or were skipped", ""] + [f"- {e}" for e in self.errors]
        lines += ["", "Run on: " + ", ".join(f"{k} {v}" for k, v in self.info.items())]
        return "\n".join(lines) + "\n"


class Ensemble(nn.Module):
    """N IRNNs stacked along a leading dimension, trained as one; the forward runs the Triton layer.

    Shape: ``x [N, B, T, 2] -> [N, B, 1]``.
    """

    def __init__(self, n_models, hidden, device, precision="tf32x3", dtype=torch.float32, **launch):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        N, H = n_models, hidden
        self.precision, self.launch = precision, launch
        noise = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
        self.w_ih = nn.Parameter(0.001 * noise(N, H, 2))
        self.w_hh = nn.Parameter(torch.eye(H) + 0.01 * noise(N, H, H) / H ** 0.5)
        self.b_ih = nn.Parameter(0.01 * noise(N, H))
        self.b_hh = nn.Parameter(0.01 * noise(N, H))
        self.w_out = nn.Parameter(noise(N, 1, H) / H ** 0.5)
        self.b_out = nn.Parameter(0.01 * noise(N, 1))
        self.to(device=device, dtype=dtype)

    def params(self):
        return list(self.parameters())

    def readout(self, last):  # [N, B, H] -> [N, B, 1]
        return torch.baddbmm(self.b_out.unsqueeze(1), last, self.w_out.transpose(1, 2))

    def forward(self, x):
        from irnn.engine.triton_rnn import rnn_layer_triton
        h = rnn_layer_triton(x, self.w_ih, self.w_hh, self.b_ih, self.b_hh, "relu", self.precision, **self.launch)
        return self.readout(h[:, :, -1])

    def reference_forward(self, x):
        """The plain loop, in this module's dtype."""
        h = x.new_zeros(x.shape[0], x.shape[1], self.w_hh.shape[-1])
        for t in range(x.shape[2]):
            h = torch.relu(x[:, :, t] @ self.w_ih.transpose(1, 2) + (self.b_ih + self.b_hh).unsqueeze(1)
                           + h @ self.w_hh.transpose(1, 2))
        return self.readout(h)

    @staticmethod
    def loss(pred, y):
        """The sum of the models' own MSEs, so that each model gets its own gradient."""
        return ((pred - y) ** 2).mean(dim=(1, 2)).sum()

    def clip_(self, params, clip_norm):
        """Clip each model's gradient to its own global norm; returns the largest norm before clipping."""
        sq = sum(p.grad.pow(2).flatten(1).sum(1) for p in params)  # [N]
        norms = sq.sqrt()
        coef = (clip_norm / (norms + 1e-6)).clamp(max=1.0)
        for p in params:
            p.grad.mul_(coef.view(-1, *([1] * (p.dim() - 1))))
        return norms.max()

    def double_copy(self):
        return copy.deepcopy(self).double()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="devout", help="folder for gpu_bench.md and gpu_bench.json")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU (Triton under its interpreter)")
    ap.add_argument("--budget-s", type=float, default=200.0, help="stop starting new parts after this many seconds")
    ap.add_argument("--min-time-s", type=float, default=0.3, help="timed seconds per row, over all repeats")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per row (the median is reported)")
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--skip-timing", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        if not args.smoke:
            print("gpu_bench: no CUDA device here; run it on a GPU machine, or pass --smoke for a CPU dry run",
                  file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"
    bench = Bench(args)
    try:
        import triton
        triton_version = triton.__version__
    except Exception as e:  # noqa: BLE001
        triton_version = f"not importable ({type(e).__name__}: {e})"
    bench.info = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton_version}
    if bench.cuda:
        p = torch.cuda.get_device_properties(0)
        bench.info["device"] = (f"{p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2 ** 30:.0f} GiB, "
                                f"capability {p.major}.{p.minor}, CUDA {torch.version.cuda}, "
                                f"cuDNN {torch.backends.cudnn.version()}")
    else:
        bench.info["device"] = "CPU (smoke run: the timings mean nothing)"
    log(", ".join(f"{k} {v}" for k, v in bench.info.items()))
    log(f"sizes: {bench.sizes}")
    t0 = time.perf_counter()
    if not args.skip_accuracy:
        log("== accuracy ==")
        bench.accuracy_part()
    if not args.skip_timing:
        log("== timing ==")
        bench.timing_part()
    if bench.cuda:
        log("== Triton kernels compiled ==")
        bench.guarded("kernel report", bench.kernel_report, need_s=0)
    bench.info["wall_s"] = round(time.perf_counter() - t0, 1)
    bench.write()
    log("")
    log(bench.table())
    log(f"total {bench.info['wall_s']} s; wrote {out / 'gpu_bench.md'} and {out / 'gpu_bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
