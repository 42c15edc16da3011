#!/usr/bin/env bash
# Submit the blocks of a stacked-context run (diffusion.stack_context: true) as a chain of Slurm jobs: block b
# starts only after block b-1 ended successfully (--dependency=afterok), since it reads b-1's finished weights.
# Every task is train_blocks.sbatch with its own array index; sbatch options go before the run directory:
#
#   launchers/slurm/submit_stacked.sh --nodes=2 --gpus-per-node=8 --time=24:00:00 -- runs/X [--set ...]
#
# Prints the job ids, block 0 first. A block whose predecessor is missing or changed refuses to start anyway.
set -euo pipefail
OPTS=()
while [[ $# -gt 0 && $1 != "--" ]]; do OPTS+=("$1"); shift; done
[[ ${1:-} == "--" ]] && shift
RUN=${1:?usage: submit_stacked.sh [SBATCH_OPTIONS ...] -- RUN_DIR [--set train.KEY=VALUE ...]}
shift
HERE=$(cd "$(dirname "$0")" && pwd)
B=$(python -c "import sys; from dbscale.run import open_run; print(open_run(sys.argv[1], verify=False).num_blocks)" "$RUN")
previous=""
for ((b = 0; b < B; b++)); do
    dependency=()
    [[ -n $previous ]] && dependency=("--dependency=afterok:$previous")
    previous=$(sbatch --parsable "${OPTS[@]}" "${dependency[@]}" --array="$b" "$HERE/train_blocks.sbatch" "$RUN" "$@")
    echo "block $b: job $previous"
done
