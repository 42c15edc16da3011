#!/usr/bin/env bash
# The masked-family demo: a masked diffusion LM over the bundled speeches made text8-style (27 characters),
# B=3 blocks over equal decrements of alpha(t), each its own DeepSpeed job, then the end-to-end baseline,
# merge, sampling (unconditional, prefix, infilling) and bits per character of both models.
# Rerunning resumes: finished jobs are skipped by their own checkpoints.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
RUN=${RUN:-runs/demo_masked}
CONFIG=${CONFIG:-configs/mdm_tiny.yaml}
export PATH="$PWD/$BIN:$PATH" OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONWARNINGS=ignore
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || export DS_ACCELERATOR=cpu
start=$(date +%s)
stage() { printf '\n\033[1m== [%s] %s\033[0m  (%ss elapsed)\n' "$1" "$2" "$(( $(date +%s) - start ))"; }

stage 1/6 "prepare $RUN from $CONFIG: text8-style characters, shards, manifest"
dbscale prepare --config "$CONFIG" --run "$RUN"
dbscale prepare --config "$CONFIG" --dry-run | python -c "
import json, sys; d = json.load(sys.stdin); p = d['partition']
print(f'masking-time partition ({p[\"schedule\"]} alpha, equal decrements; block: t interval -> widened training interval):')
for b, (iv, tr) in enumerate(zip(p['block_intervals'], p['train_intervals'])):
    print(f'  block {b}: [{iv[0]:.4f}, {iv[1]:.4f}] -> [{tr[0]:.4f}, {tr[1]:.4f}], {d[\"layers_per_block\"][b]} layer(s)')"

B=$(python -c "from dbscale.run import open_run; print(open_run('$RUN').num_blocks)")
for ((b = 0; b < B; b++)); do
  stage 2/6 "train block $b of $B as its own DeepSpeed job (its t-slice only)"
  dbscale train --run "$RUN" --block "$b"
done

stage 3/6 "train the end-to-end baseline (all layers over t in [0, 1], same data and steps)"
dbscale train --run "$RUN" --e2e

stage 4/6 "merge both into safetensors models"
dbscale merge --run "$RUN"
dbscale merge --run "$RUN" --e2e

stage 5/6 "sample from all-mask (each step served by the block owning its t) and score bits per character"
for model in "$RUN/merged" "$RUN/e2e/merged"; do
  dbscale generate --model "$model" --num-samples 2 --steps 128 \
    --prompt "the state of the union" --infill "we the people of the ________ states in order to form a more ______ union" \
    --bpc "$RUN" --bpc-windows 64 --t-samples 8
done

stage 6/6 "report and summary"
dbscale report --run "$RUN"
dbscale status --run "$RUN"
echo "masked demo finished in $(( $(date +%s) - start ))s. Report: $RUN/report/index.html"
