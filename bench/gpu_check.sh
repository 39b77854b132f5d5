#!/usr/bin/env bash
# GPU check for retrieval_gateway: the cuda-marked gateway tests, then the index benchmark on cuda at
# Phoenix scale (10M x 64, k=1000; bf16, with fp32 as the recall reference). Run from anywhere on a
# CUDA host whose .venv has a CUDA build of torch (make setup TORCH_SPEC=...). Writes
# results/index_bench_cuda.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "torch sees no CUDA device")'
"$PY" -m pytest -q -m cuda tests/unit/test_gateway_topk.py tests/unit/test_gateway_index.py
"$PY" bench/index_bench.py --device cuda --n 10000000 --dim 64 --k 1000 --batches 1 32 \
  --dtypes fp32 bf16 --no-faiss --out results/index_bench_cuda.json
