"""Process-group setup for DeepSpeed jobs, on CUDA (nccl) or CPU (gloo).

The same script runs under the `deepspeed` launcher (which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*)
and as a plain `python` process (one rank; the variables are filled in here).
"""

from __future__ import annotations

import os
import socket
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, int]:
    """Initialise torch.distributed through DeepSpeed. Returns (rank, world_size, local_rank)."""
    if "RANK" not in os.environ:  # plain `python launchers/...`: one process
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("LOCAL_RANK", os.environ.get("RANK", "0"))
    import torch

    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", os.environ["WORLD_SIZE"])))
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        # The deepspeed launcher leaves OMP threads unset: N ranks x all cores oversubscribes the CPU.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # say it, rather than have DeepSpeed warn it guessed
    import deepspeed

    # DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce op (~40 s, ~2 GB RSS) in
    # init_distributed; gloo does not need it. `deepspeed.comm.torch` re-exports torch, hence sys.modules.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])


def finish(code: int = 0) -> None:
    """End a job: barrier, flush, hard exit. A plain interpreter exit under the deepspeed launcher
    sometimes aborts rank 1 ('terminate called without an active exception', rc 250) when rank 0, the
    TCPStore host, exits first."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and code == 0:
        try:
            dist.barrier()
        except Exception:  # a dead peer must not hide this rank's exit status
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
