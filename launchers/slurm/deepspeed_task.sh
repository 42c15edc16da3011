#!/usr/bin/env bash
# One DeepSpeed job over the nodes of the current Slurm allocation: what train_blocks.sbatch and
# train_e2e.sbatch run. Usage (inside an allocation): deepspeed_task.sh JOB_NAME SCRIPT ARGS...
#
# A hostfile is written from SLURM_JOB_NODELIST; `srun` starts the deepspeed launcher once per node with
# --no_ssh --node_rank (neither pdsh nor ssh is needed). Processes per node: the GPUs Slurm gave the task
# (SLURM_GPUS_ON_NODE), else DBSCALE_PROCS_PER_NODE, else 1 (a CPU node). The master port is one that is
# free on the first node now, so two tasks on one node never collide; it is printed.
set -euo pipefail
NAME=$1
shift
: "${SLURM_JOB_ID:?run inside a Slurm allocation (sbatch)}"
SLOTS=${SLURM_GPUS_ON_NODE:-${DBSCALE_PROCS_PER_NODE:-1}}
DIR=${DBSCALE_HOSTFILE_DIR:-$PWD}
HOSTFILE="$DIR/hostfile.slurm-$SLURM_JOB_ID${SLURM_ARRAY_TASK_ID:+_$SLURM_ARRAY_TASK_ID}"
mkdir -p "$DIR"
scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/ slots=$SLOTS/" > "$HOSTFILE"
MASTER=$(head -n 1 "$HOSTFILE" | cut -d' ' -f1)
PORT=${DBSCALE_MASTER_PORT:-$(python -c "from dbscale.train.distributed import free_port; print(free_port())")}
echo "[slurm] $NAME: job $SLURM_JOB_ID, nodes $(paste -sd, < <(cut -d' ' -f1 "$HOSTFILE")), $SLOTS process(es) per node, master $MASTER:$PORT"
# srun forwards the signals Slurm sends the step (scancel --signal, --signal=TERM@T) to every process of it:
# the training processes save a checkpoint on SIGTERM and exit 0.
exec srun --kill-on-bad-exit=1 bash -c "exec deepspeed --hostfile '$HOSTFILE' --no_ssh --node_rank \$SLURM_NODEID \
  --master_addr '$MASTER' --master_port $PORT --log_level warning $(printf "%q " "$@")"
