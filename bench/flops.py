"""Training FLOPs of every block job against the end-to-end job, for any shape, without running the arithmetic.

    python bench/flops.py                     # the paper's shape (12 x 768, V 32000, seq 256) and 24 x 2048
    python bench/flops.py --shapes full --blocks 4 --micro-batch 4

Each job's model is built on torch's meta device (shapes only, no memory, no arithmetic) and one training step
(forward + backward of the family's loss) runs under dbscale.profiling.count_flops, so a 24 x 2048 model is
counted in seconds on this CPU. The count is the one bench/throughput.py takes on real tensors, but for
attention: on the meta device torch runs the math kernel (4 products in backward) where the CPU's fused kernel
is counted with torch's fused formula (5), so meta counts are up to 1% lower; the ratios are what this bench is
for. Writes bench/results/flops.json: per shape and block layout, each block job's GFLOP per step, their sum,
and the sum over the end-to-end job's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHAPES, bench_job, write_results  # noqa: E402

BIG = {"n_layers": 24, "d_model": 2048, "n_heads": 16, "seq_len": 256, "vocab": 32000}
ALL_SHAPES = {**SHAPES, "24x2048": BIG}

# The block layouts compared: model keys of each (the end-to-end job is the same for all).
LAYOUTS = {
    "two_stream": {"block": "two_stream"},
    "stream": {"block": "stream"},
    "stream_sigma_free": {"block": "stream", "time_conditioning": False},
    "stream_sigma_free_stacked": {"block": "stream", "time_conditioning": False},  # + diffusion.stack_context
}
STACKED = {"stream_sigma_free_stacked"}  # block b also runs blocks 0..b-1 forward, frozen


def job_flops(
    shape: dict, B: int, block: int | None, model_keys: dict, micro_batch: int, noisy_fraction: float, stacked=False
) -> int:
    import torch

    from dbscale.families import StepInfo
    from dbscale.profiling import count_flops

    meta = torch.device("meta")
    with meta:
        family, job, model = bench_job("llama", shape, B, model_keys, meta)
    if block is not None:
        job.block = block
    job.cfg.diffusion.noisy_fraction = noisy_fraction
    if stacked and block:  # the job's block reads the frozen residual stream of blocks 0..b-1 (forward only)
        job.cfg.diffusion.stack_context = True
        with meta:
            model = family.build(job)
            predecessors = []
            for b in range(block):
                job.block = b
                predecessors.append(family.build(job))
                if b:
                    predecessors[-1].read_from(predecessors[:-1])
            job.block = block
        model.read_from(predecessors)
    if "table" in job.extras:
        job.extras["table"] = job.extras["table"].to(meta)
    window = torch.randint(0, shape["vocab"], (micro_batch, family.window_length(job.cfg)))
    draw = tuple(x.to(meta) for x in family.draw(job, window, 0))  # drawn on the CPU: meta has no generator
    window = window.to(meta)
    return count_flops(lambda: family.loss(job, model, window, draw, StepInfo(0, 0, 0))[0].backward())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="full,24x2048", help=f"comma-separated, of {list(ALL_SHAPES)}")
    p.add_argument("--blocks", type=int, default=4, help="B")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated, of {list(LAYOUTS)}")
    p.add_argument("--noisy-fractions", default="1", help="diffusion.noisy_fraction values, comma-separated")
    p.add_argument("--out", default="flops.json", help="file name in bench/results/")
    args = p.parse_args()
    shapes = args.shapes.split(",")
    layouts = args.layouts.split(",")
    for name, known in ((shapes, ALL_SHAPES), (layouts, LAYOUTS)):
        unknown = [x for x in name if x not in known]
        if unknown:
            p.error(f"unknown {unknown}; choose from {list(known)}")
    fractions = [float(f) for f in args.noisy_fractions.split(",")]
    rows = []
    print(f"{'shape':>8} {'layout':>18} {'noisy f':>7} {'e2e GFLOP':>10} {'block GFLOP':>12} {'sum / e2e':>9}")
    for shape_name in shapes:
        shape = ALL_SHAPES[shape_name]
        e2e = job_flops(shape, 1, None, {}, args.micro_batch, 1.0)
        for layout in layouts:
            for f in fractions:
                stacked = layout in STACKED
                blocks = [
                    job_flops(shape, args.blocks, b, LAYOUTS[layout], args.micro_batch, f, stacked)
                    for b in range(args.blocks)
                ]
                row = {
                    "shape": shape_name,
                    "shape_keys": shape,
                    "layout": layout,
                    "model_keys": LAYOUTS[layout],
                    "stack_context": stacked,
                    "noisy_fraction": f,
                    "B": args.blocks,
                    "micro_batch": args.micro_batch,
                    "e2e_flops_per_step": e2e,
                    "block_flops_per_step": blocks,
                    "sum_over_e2e": sum(blocks) / e2e,
                }
                rows.append(row)
                print(
                    f"{shape_name:>8} {layout:>18} {f:7.2f} {e2e / 1e9:10.1f} {blocks[0] / 1e9:12.1f} "
                    f"{row['sum_over_e2e']:9.3f}"
                )
    path = write_results(args.out, {"counted_on": "meta device (shapes only)", "rows": rows})
    print(f"[flops] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
