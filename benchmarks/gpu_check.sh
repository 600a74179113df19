#!/usr/bin/env bash
# The one device check of the GPU engines (CUDA graph, Triton layer): accuracy against float64,
# timings, then the GPU-only tests. Under 5 minutes on an H200, Triton compilation included.
#
#   bash benchmarks/gpu_check.sh        # writes into $OUT (the device tool's folder), else ./devout
#
# Files: env.txt, gpu_bench.log, gpu_bench.md (the tables), gpu_bench.json, pytest.log.
set -u
source "$(dirname "$0")/device_env.sh"

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true
  python3 -c "import numpy; print('numpy', numpy.__version__)"
} 2>&1 | tee "$OUT/env.txt"

# The benchmark starts no new part after --budget-s; the hard limit is the timeout.
timeout -k 5 175 python3 benchmarks/gpu_bench.py --out "$OUT" --budget-s 140 2>&1 | tee "$OUT/gpu_bench.log"
echo "gpu_bench exit status: ${PIPESTATUS[0]}" | tee -a "$OUT/gpu_bench.log"

timeout -k 5 90 python3 -m pytest -q -rs -p no:cacheprovider tests/test_cuda_graph.py tests/test_triton_rnn.py \
  2>&1 | tee "$OUT/pytest.log"
echo "pytest exit status: ${PIPESTATUS[0]}" | tee -a "$OUT/pytest.log"
