#!/usr/bin/env bash
# The GPU tables of the performance benches in one call (bf16, CUDA max_memory_allocated, MFU), at the paper's
# shape: about 6-8 minutes on one H100 (give the call 540 s; the steps run in order of interest). Prepare the
# wheels on the CPU machine first (bash bench/gpu_wheels.sh), then run this on the GPU machine with .whl carried.
# Each step writes bench/results/<name>_cuda.json; a step that fails or runs past its limit is logged and the
# next one runs. With $OUT set, the results are packed into $OUT/results_cuda.tgz after every step and the log is
# $OUT/gpu_bench.log. `bash bench/gpu.sh --quick` runs the same steps at the small shape, with every file under
# /tmp/dbscale_gpu_trial (a trial of the script itself, on any machine).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
QUICK=()
SCALE=1
PACK="bench/results/*_cuda.json"
if [ "${1:-}" = "--quick" ]; then
  QUICK=(--quick)
  SCALE=4  # the limits are a GPU's; a CPU needs longer even at the small shape
  export DBSCALE_BENCH_RESULTS=/tmp/dbscale_gpu_trial
  PACK="$DBSCALE_BENCH_RESULTS/*.json"
  mkdir -p "$DBSCALE_BENCH_RESULTS"
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LOG=${OUT:-${DBSCALE_BENCH_RESULTS:-/tmp}}/gpu_bench.log
if [ ${#QUICK[@]} -eq 0 ] && ls .whl/*.whl >/dev/null 2>&1; then  # the GPU image's Python, 3.12
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

step() {  # step LIMIT_S ARGS...: one bench, its output in the log, its last lines on screen
  local limit=$1 t0=$SECONDS out
  shift
  out=$(mktemp)
  echo "== $*" | tee -a "$LOG"
  timeout $((limit * SCALE)) "$PY" "$@" "${QUICK[@]}" >"$out" 2>&1
  local rc=$?
  cat "$out" >>"$LOG"
  tail -n 14 "$out"
  rm -f "$out"
  echo "== rc $rc in $((SECONDS - t0)) s" | tee -a "$LOG"
  pack
}

pack() {  # after every step, so a call cut short still returns what it measured
  if [ -n "${OUT:-}" ]; then
    tar czf "$OUT/results_cuda.tgz" ${PACK} 2>/dev/null || true
  fi
}

(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true) | tee -a "$LOG"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$LOG"
# the most wanted first: training time and FLOPs, memory, generation, then DeepSpeed's offload
step 120 bench/throughput.py --blocks 4 --micro-batch 4
step 120 bench/memory.py --blocks 1,4 --levels paper,checkpointing --micro-batch 4 --fresh
step 90 bench/generate.py --blocks 4 --new-tokens 64 --repeats 2 --profile
step 240 bench/offload.py --blocks 4 --micro-batch 4  # DeepSpeed compiles FusedAdam and CPU Adam first
step 90 bench/throughput.py --blocks 4 --micro-batch 4 --target-dim 128
step 60 bench/generate.py --blocks 4 --new-tokens 64 --repeats 2 --target-dim 128
if [ ${#QUICK[@]} -eq 0 ]; then step 30 bench/matmul_rows.py; fi
