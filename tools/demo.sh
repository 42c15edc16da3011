#!/usr/bin/env bash
# The dbscale demo: the whole life of a DiffusionBlocks run on the bundled speeches, on this machine.
# prepare -> 4 block jobs (each its own DeepSpeed job) -> the end-to-end baseline -> merge -> sample
# -> evaluate (MAUVE with offline MiniLM features) -> report (R/report/index.html).
# Rerunning resumes: finished jobs are skipped by their own checkpoints, nothing is redone or lost.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
RUN=${RUN:-runs/demo}
CONFIG=${CONFIG:-configs/llama_tiny.yaml}
export PATH="$PWD/$BIN:$PATH" OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONWARNINGS=ignore
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || export DS_ACCELERATOR=cpu
start=$(date +%s)
stage() { printf '\n\033[1m== [%s] %s\033[0m  (%ss elapsed)\n' "$1" "$2" "$(( $(date +%s) - start ))"; }

stage 1/7 "prepare $RUN from $CONFIG: tokenizer, shards, frozen target embedding, noise calibration, manifest"
dbscale prepare --config "$CONFIG" --run "$RUN"
python -c "
from dbscale.run import open_run; m = open_run('$RUN').manifest; p = m['partition']
print(f'noise partition ({p[\"kind\"]}; block: sigma interval -> widened training interval):')
for b, (iv, tr) in enumerate(zip(p['block_intervals'], p['train_intervals'])):
    print(f'  block {b}: [{iv[0]:.4f}, {iv[1]:.4f}] -> [{tr[0]:.4f}, {tr[1]:.4f}], {m[\"layers_per_block\"][b]} layer(s)')"

B=$(python -c "from dbscale.run import open_run; print(open_run('$RUN').num_blocks)")
for ((b = 0; b < B; b++)); do
  stage 2/7 "train block $b of $B as its own DeepSpeed job (no gradient or activation crosses blocks)"
  dbscale train --run "$RUN" --block "$b"
done

stage 3/7 "train the end-to-end baseline (same layers, same data, same number of steps)"
dbscale train --run "$RUN" --e2e

stage 4/7 "merge: consolidate each DeepSpeed checkpoint into one safetensors model"
dbscale merge --run "$RUN"
dbscale merge --run "$RUN" --e2e

stage 5/7 "sample (greedy, as in the paper) and score held-out text with both models"
for model in "$RUN/merged" "$RUN/e2e/merged"; do
  dbscale generate --model "$model" --max-new-tokens 40 \
    --prompt "The state of the Union" --prompt "Our economy" --prompt "I propose" \
    --heldout "$RUN" --heldout-windows 32
done

stage 6/7 "evaluate both on the same held-out prompts: MAUVE (MiniLM features), generative perplexity, held-out CE"
dbscale evaluate --model "$RUN/merged" --compare "$RUN/e2e/merged" --data "$RUN" --num-prompts 250 \
  --out "$RUN/report/eval.json" > /dev/null

stage 7/7 "report and summary"
dbscale report --run "$RUN"
dbscale status --run "$RUN"
echo "demo finished in $(( $(date +%s) - start ))s. Report: $RUN/report/index.html; TensorBoard: tensorboard --logdir $RUN"
