"""ZeRO-Offload (`train.offload_optimizer`) against a job without it, through the DeepSpeed engine a job uses.

    python bench/offload.py --quick                        # seconds per job
    python bench/offload.py --blocks 4 --micro-batch 4     # the paper's shape
    python bench/offload.py --level checkpointing          # with chunked CE and activation checkpointing

DeepSpeed's own memory lever, measured apart from the model's switches (bench/memory.py): the end-to-end job
and block 0 of B, each with and without the optimizer state offloaded to host memory, each in its own process,
built by the family and wrapped by deepspeed.initialize with the config dbscale derives from train.* (so the
precision is bf16 on a GPU, fp32 on a CPU). Reports the median step time (forward, backward and the optimizer
step, after the first) and the peak memory: torch.cuda.max_memory_allocated on a GPU, where the offload
takes the AdamW state and fp32 master weights off the device; on a CPU-only machine the peak RSS rise, where
the offloaded state stays in the same memory (the run shows the lever works there, not what it saves).
Writes bench/results/offload_<shape>[_<level>].json (_cuda.json on a GPU).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    E2E_LEVELS,
    LEVELS,
    SHAPES,
    _warm_up_runtime,
    bench_job,
    mib,
    parse_or_measure,
    peak_rss_bytes,
    rss_bytes,
    run_worker,
    write_results,
)


def measure(spec: dict) -> dict:
    """One job of spec = {shape, B, level, micro_batch, steps, offload} through a DeepSpeed engine."""
    import torch

    from dbscale.train.distributed import init_distributed

    init_distributed()  # one rank, a free port
    import deepspeed

    from dbscale.families import StepInfo
    from dbscale.train.deepspeed_config import deepspeed_config

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    shape, B, level = SHAPES[spec["shape"]], spec["B"], LEVELS[spec["level"]]
    model_keys = {k: level[k] for k in ("head", "context_embedding") if k in level}
    _warm_up_runtime(device)
    torch.manual_seed(0)
    rss0 = rss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    family, job, model = bench_job("llama", shape, B, model_keys, device)
    train = job.cfg.train
    train.micro_batch, train.grad_accum = spec["micro_batch"], 1
    train.ce_chunk = level.get("ce_chunk", 0)
    train.offload_optimizer = spec["offload"]
    model.activation_checkpointing = bool(level.get("activation_checkpointing"))
    config = deepspeed_config(train, world_size=1)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=config
    )
    assert engine.zero_cpu_offload() is spec["offload"]
    g = torch.Generator(device="cpu").manual_seed(1)
    length = family.window_length(job.cfg)
    times = []
    for step in range(spec["steps"]):
        window = torch.randint(0, shape["vocab"], (spec["micro_batch"], length), generator=g).to(engine.device)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = family.loss(job, engine, window, family.draw(job, window, step), StepInfo(0, step, 0))[0]
        engine.backward(loss)
        engine.step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    out = {
        **spec,
        "dtype": "bf16" if config["bf16"]["enabled"] else "fp32",
        "optimizer": type(
            engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
        ).__name__,
        "zero_optimization": config["zero_optimization"],
        "layers": shape["n_layers"] if B == 1 else shape["n_layers"] // B,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "step_s": statistics.median(times[1:]),
        "step_times_s": times,
        "final_loss": float(loss),
    }
    if cuda:
        out.update(peak_bytes=torch.cuda.max_memory_allocated(), peak_kind="cuda_max_memory_allocated")
    else:
        out.update(peak_bytes=peak_rss_bytes() - rss0, peak_kind="peak RSS minus RSS before the model was built")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--blocks", type=int, default=4, help="B (block 0 of B is measured)")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="steps per job; the first is not timed")
    p.add_argument("--level", default="paper", choices=list(E2E_LEVELS), help="switch level (bench/common.py)")
    args = parse_or_measure(p, measure)
    if args is None:
        return 0
    if args.steps < 2:
        p.error("--steps must be >= 2 (the first step is not timed)")
    shape = "quick" if args.quick else "full"
    base = {"shape": shape, "level": args.level, "micro_batch": args.micro_batch, "steps": args.steps}
    rows = []
    for B in (1, args.blocks):
        for offload in (False, True):
            rows.append(run_worker(__file__, {**base, "B": B, "offload": offload}))
            r = rows[-1]
            print(f"[offload] {'e2e' if B == 1 else f'block 0 of {B}'}, offload {offload}: {r['step_s']:.3f} s/step")
    reference = rows[0]["peak_bytes"]
    print(
        f"\nZeRO-Offload, Llama family, shape '{shape}', level '{args.level}', micro-batch {args.micro_batch}, "
        f"{rows[0]['dtype']}; peak = {rows[0]['peak_kind']}, MiB"
    )
    print(f"{'job':>14} {'offload':>8} {'optimizer':>16} {'step s':>8} {'vs off':>7} {'peak':>8} {'vs e2e':>7}")
    for r in rows:
        twin = next(x for x in rows if x["B"] == r["B"] and not x["offload"])
        name = "e2e" if r["B"] == 1 else f"block 0 of {r['B']}"
        print(
            f"{name:>14} {str(r['offload']):>8} {r['optimizer']:>16} {r['step_s']:8.3f} "
            f"{r['step_s'] / twin['step_s']:7.2f} {mib(r['peak_bytes']):>8} {r['peak_bytes'] / reference:7.3f}"
        )
    suffix = "" if args.level == "paper" else f"_{args.level}"
    path = write_results(f"offload_{shape}{suffix}.json", {"rows": rows})
    print(f"[offload] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
