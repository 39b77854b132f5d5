#!/usr/bin/env bash
# GPU check (issue 14): the cuda-marked tests, the index at Phoenix scale (10M x 64, k=1000, B=1 and 32;
# bf16, with fp32 as the recall reference), then the end-to-end stack (synthetic 1M-item corpus, quick
# levels) with retrieval_gateway and user_service on cuda. Made for a GPU machine that has Python 3.12
# with a CUDA build of torch and no package registry:
#   - python: $PY if set, else .venv/bin/python if there is one, else python3;
#   - wheels in .whl/ (ignored; `--prepare` fills it) are installed with --target into a scratch folder
#     put first on PYTHONPATH, unless $PY is the project's .venv (it has them);
#   - twotower/ (generated, ignored) is used as carried, regenerated when grpc_tools is there;
#   - the repository goes on PYTHONPATH (no pip install -e).
# Each step is bounded by `timeout` within one overall budget and the next step runs whatever the last
# one did; results go to the --out folder (env GPU_CHECK_OUT, default results/): gpu_check.json,
# report.md, gpu_check.log (everything printed), env.txt (versions, nvidia-smi), index_bench_<device>.json,
# e2e_synthetic[_cuda].json and gpu_profile.tar.gz (profile/: the fused kernel's sweep in fused/,
# bench/gpu_profile.py's breakdown, and in spy/ bench/spy_stack.py's py-spy on the services, the last
# two when the budget leaves time for them; one archive: the device tool returns at most 8 files).
# A summary table is printed last. Exit status 0 when every step passed.
#
#   bench/gpu_check.sh --prepare                        # here, first: fresh twotower/, complete .whl/
#   PY=python3 bash bench/gpu_check.sh --out results/gpu   # on the GPU machine (its own python3)
#   PY=path/to/python3.12 bash bench/gpu_check.sh --device cpu --quick   # CPU rehearsal, same set-up
#
# Options: --out DIR, --device cuda|cpu (default cuda), --quick (small sizes, for a CPU rehearsal),
# --budget-s S (whole run, default 450), --prepare (only prepare twotower/ and .whl/, then exit).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)

OUT_DIR=${GPU_CHECK_OUT:-results}
DEVICE=cuda
QUICK=0
BUDGET_S=450
PREPARE=0
usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT_DIR=${2:?--out needs a folder}; shift 2 ;;
    --out=*) OUT_DIR=${1#--out=}; shift ;;
    --device) DEVICE=${2:?--device needs cuda or cpu}; shift 2 ;;
    --device=*) DEVICE=${1#--device=}; shift ;;
    --quick) QUICK=1; shift ;;
    --budget-s) BUDGET_S=${2:?--budget-s needs seconds}; shift 2 ;;
    --prepare) PREPARE=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$DEVICE" in cuda|cpu) ;; *) echo "gpu_check.sh: --device must be cuda or cpu" >&2; exit 2 ;; esac

if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if [ "$PREPARE" = 1 ]; then
  exec "$PY" bench/gpu_check.py prepare --download
fi

START=$(date +%s)
DEADLINE=$((START + BUDGET_S))
RESERVE_S=25  # kept for the report and the summary
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
LOG="$OUT_DIR/gpu_check.log"
: >"$LOG"
: >"$WORK/steps.tsv"
export PYTHONUNBUFFERED=1
say() { echo "$*" | tee -a "$LOG"; }

# step NAME CAP_S COMMAND...: run within min(CAP_S, what the budget leaves), log it, record the outcome.
step() {
  local name=$1 cap=$2
  shift 2
  local left=$((DEADLINE - $(date +%s) - RESERVE_S))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 5 ]; then
    say "== [$name] skipped: the budget of ${BUDGET_S}s is spent"
    printf '%s\tskipped\t0\t0\t0\t%s\n' "$name" "$*" >>"$WORK/steps.tsv"
    return 1
  fi
  say "== [$name] (at most ${limit}s): $*"
  local t0 t1 rc status
  t0=$(date +%s.%N)
  timeout -k 15 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  t1=$(date +%s.%N)
  case "$rc" in 0) status=ok ;; 124|137) status=timeout ;; *) status=failed ;; esac
  say "== [$name] $status (exit $rc) after $(awk "BEGIN{printf \"%.1f\", $t1 - $t0}")s"
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$(awk "BEGIN{print $t1 - $t0}")" "$limit" "$*" \
    >>"$WORK/steps.tsv"
  return "$rc"
}

say "gpu_check: device=$DEVICE quick=$QUICK budget=${BUDGET_S}s python=$PY out=$OUT_DIR work=$WORK"

# 1. Wheels the image lacks (or has at other versions), first on the path; then the repository itself.
PYPATH="$REPO"
if compgen -G ".whl/*.whl" >/dev/null && [ "$PY" != ".venv/bin/python" ]; then
  if step wheels 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WORK/site" .whl/*.whl; then
    PYPATH="$WORK/site:$PYPATH"
  fi
fi
export PYTHONPATH="$PYPATH${PYTHONPATH:+:$PYTHONPATH}"

# 2. Generated code: as carried, or regenerated where grpc_tools is installed.
step protos 60 "$PY" bench/gpu_check.py protos --regenerate --python "$PY"

# 3. What runs here: versions (grpc/protobuf must be the pinned pair), the GPU, nvidia-smi.
step env 90 "$PY" bench/gpu_check.py env --device "$DEVICE" --txt "$OUT_DIR/env.txt" --json "$WORK/env.json"

# 4. Tests: the cuda-marked ones on a GPU; on a CPU rehearsal, the same files without the slow ones.
mapfile -t TEST_FILES < <(grep -rl --include='test_*.py' 'pytest.mark.cuda' tests | sort)
if [ "$DEVICE" = cuda ]; then MARK=cuda; else MARK="not slow"; fi
step tests 150 "$PY" -m pytest -q -p no:cacheprovider -m "$MARK" --junitxml="$WORK/pytest.xml" \
  "${TEST_FILES[@]}"

# 5. The fused split-query kernel (retrieval_gateway/topk_triton.py) against the cuBLAS path, per batch
# size, at 10M x 64 bf16, k=1000 (bench/gpu_profile.py --fused-only; figures in the log). A CPU
# rehearsal runs the kernel under Triton's interpreter on a tiny corpus (where Triton is installed).
if [ "$QUICK" = 1 ]; then FUSED=(--quick --n 3000 --k 10); FUSED_ENV=(TRITON_INTERPRET=1); else FUSED=(); FUSED_ENV=(); fi
step fused 90 env "${FUSED_ENV[@]}" "$PY" bench/gpu_profile.py --device "$DEVICE" --fused-only "${FUSED[@]}" \
  --out "$WORK/profile/fused"

# 6. The index: exact top-k at 10M x 64 (quick: 200k), k=1000, B=1 and 32, fp32 and bf16.
if [ "$QUICK" = 1 ]; then SIZE=(--quick --n 200000); else SIZE=(--n 10000000); fi
step index 180 "$PY" bench/index_bench.py --device "$DEVICE" "${SIZE[@]}" --dim 64 --k 1000 --batches 1 32 \
  --dtypes fp32 bf16 --index-dtypes bf16 --no-faiss --no-fused --out "$OUT_DIR/index_bench_$DEVICE.json"

# 7. End to end: the three services on loopback, gateway and user_service on $DEVICE.
if [ "$QUICK" = 1 ]; then E2E=(--synthetic-items 50000 --concurrency 1 8 --seconds 2 --baseline-seconds 1); else E2E=(); fi
step e2e 300 "$PY" bench/e2e_bench.py --quick --corpus synthetic --device "$DEVICE" "${E2E[@]}" \
  --workdir "$WORK/e2e" --out-dir "$OUT_DIR"

# 8. bench/report.py's tables over this run's JSON (in the scratch folder: it also draws PNG plots).
mkdir -p "$WORK/report"
cp "$OUT_DIR"/index_bench_*.json "$OUT_DIR"/e2e_*.json "$WORK/report/" 2>/dev/null
RESERVE_S=10 step report 30 "$PY" bench/report.py --results "$WORK/report"

# 9. Where the time goes (bench/gpu_profile.py: the search's pieces, the prefilter sweep, torch.profiler
# tables, the user tower's request path, the gRPC floor), with what the budget leaves; its files travel
# as one archive (a GPU machine returns few files).
if [ "$QUICK" = 1 ]; then PROFILE=(--quick --n 200000 --small-n 50000); else PROFILE=(); fi
RESERVE_S=10 step profile 150 "$PY" bench/gpu_profile.py --device "$DEVICE" "${PROFILE[@]}" \
  --out "$WORK/profile"

# 10. py-spy on the gateway and user_service while the stack serves c=1 (bench/spy_stack.py): where a
# request's host time goes, per thread and frame. Only where py-spy is (the carried wheel has it).
SPY_BIN=""
if [ -x "$WORK/site/bin/py-spy" ]; then SPY_BIN="$WORK/site/bin/py-spy"
elif [ -x "$(dirname "$PY")/py-spy" ]; then SPY_BIN="$(dirname "$PY")/py-spy"
elif command -v py-spy >/dev/null; then SPY_BIN=$(command -v py-spy); fi
if [ -n "$SPY_BIN" ]; then
  if [ "$QUICK" = 1 ]; then SPY_SIZE=(--synthetic-items 50000 --seconds 4); else SPY_SIZE=(); fi
  RESERVE_S=10 step spy 120 "$PY" bench/spy_stack.py --device "$DEVICE" --py-spy "$SPY_BIN" \
    "${SPY_SIZE[@]}" --out "$WORK/profile/spy"
else
  say "== [spy] skipped: no py-spy here (bench/gpu_check.sh --prepare puts its wheel in .whl/)"
fi
# One archive for steps 5, 9 and 10 (a separate spy.tar.gz was a ninth file, left behind).
[ -d "$WORK/profile" ] && tar czf "$OUT_DIR/gpu_profile.tar.gz" -C "$WORK" profile

QUICK_FLAG=()
[ "$QUICK" = 1 ] && QUICK_FLAG=(--quick)
"$PY" bench/gpu_check.py summary --out "$OUT_DIR" --work "$WORK" --device "$DEVICE" --budget-s "$BUDGET_S" \
  "${QUICK_FLAG[@]}" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
say "gpu_check: $(($(date +%s) - START))s in all; scratch (service logs, plots) in $WORK"
exit "$rc"
