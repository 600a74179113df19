#!/usr/bin/env bash
# The whole device session in one call: the GPU engines' accuracy and speed (gpu_check.sh), the
# library's training step against nn.RNN eager on CUDA (bench_step.py), and end-to-end training on
# CUDA: one run (CUDA-graph engine) and a 4-member ensemble (Triton engine) against the same runs alone.
set -u
source "$(dirname "$0")/device_env.sh"

bash benchmarks/gpu_check.sh

timeout -k 5 90 python3 benchmarks/bench_step.py --device cuda --seq-len 150 400 --repeats 3 --steps 20 \
  --ensemble 64 512 2>&1 | tee "$OUT/bench_step_cuda.md"

{
  timeout -k 5 60 python3 -m irnn.cli train --device cuda --seq-len 150 --steps 4000 --batch-size 32 --lr 1e-3 \
    --eval-every 500 --test-size 2000 --out /tmp/gpuruns --name irnn150 --quiet
  echo "train exit status: $?"
  timeout -k 5 80 python3 - <<'PY'
import json, time
import torch
import irnn
from irnn.train import train, train_many
from irnn.train.ensemble import ensemble_key
base = dict(seq_len=150, steps=600, eval_every=200, log_every=100, test_size=1000, quiet=True, batch_size=16,
            device="cuda", lr=1e-3)
cfgs = [irnn.Config(**base, seed=s, init_scale=sc) for s, sc in [(0, 1.0), (1, 0.5), (2, 1.0), (3, 0.01)]]
print("ensemble key:", ensemble_key(cfgs[0]))
t = time.perf_counter(); ens = train_many(cfgs, [f"/tmp/gpuens/m{i}" for i in range(4)]); t_ens = time.perf_counter() - t
t = time.perf_counter(); alone = [train(c, out_dir=f"/tmp/gpuens/a{i}") for i, c in enumerate(cfgs)]; t_alone = time.perf_counter() - t
print(f"4-member ensemble {t_ens:.1f} s, the same runs one after another {t_alone:.1f} s (engines: "
      f"{ens[0].summary['engine']} / {alone[0].summary['engine']})")
for e, a in zip(ens, alone):
    ee, aa = e.metrics("eval"), a.metrics("eval")
    print(e.summary["status"], [(x["step"], round(x["test_mse"], 5), round(y["test_mse"], 5)) for x, y in zip(ee, aa)])
PY
  echo "ensemble exit status: $?"
} 2>&1 | tee "$OUT/train_cuda.txt"
