#!/usr/bin/env bash
# GPU check: the cuda-marked gateway tests, the index benchmark on cuda at Phoenix scale (10M x 64,
# k=1000; bf16, with fp32 as the recall reference), then the end-to-end benchmark (synthetic 1M-item
# corpus, quick levels) with retrieval_gateway and user_service on cuda. Run from anywhere on a CUDA
# host whose .venv has a CUDA build of torch (make setup TORCH_SPEC=...). Writes
# results/index_bench_cuda.json and results/e2e_synthetic_cuda.json (the gateway's device and the GPU
# name are recorded in it), then results/report.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "torch sees no CUDA device")'
"$PY" -m pytest -q -m cuda tests/unit/test_gateway_topk.py tests/unit/test_gateway_index.py
"$PY" bench/index_bench.py --device cuda --n 10000000 --dim 64 --k 1000 --batches 1 32 \
  --dtypes fp32 bf16 --no-faiss --out results/index_bench_cuda.json
"$PY" bench/e2e_bench.py --quick --corpus synthetic --device cuda
"$PY" bench/report.py
