"""Training throughput of each block job vs the end-to-end job, on this machine, in one run.

    python bench/throughput.py --quick                   # seconds per job
    python bench/throughput.py --blocks 4 --micro-batch 4  # the paper's shape

Each job runs in its own process (bench/common.py): the end-to-end LlamaLM with L layers, then every block
b of B with its L/B layers (AdaLN, the doubled clean + noisy sequence; --block stream: one pass over the clean
tokens). Reports median step time and
training tokens/s of each, and the sum of the block jobs' step times, which is what training all blocks
costs in machine time (when the blocks run one after another on one machine; on B machines the wall time is
the slowest block's). Writes bench/results/throughput_<shape>.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    E2E_LEVELS,
    LEVELS,
    datasheet_peak_flops,
    matmul_peak_flops,
    measure_job,
    parse_or_measure,
    run_worker,
    write_results,
)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--blocks", type=int, default=4, help="B")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=6, help="steps per job; the first is not timed")
    p.add_argument("--level", default="paper", choices=list(LEVELS), help="switch level (bench/common.py LEVELS)")
    p.add_argument(
        "--noisy-fraction",
        type=float,
        default=1.0,
        help="the block jobs' diffusion.noisy_fraction (the share of positions a step denoises; 1 = all)",
    )
    p.add_argument(
        "--prior-loss",
        type=float,
        default=1.0,
        help="the block jobs' diffusion.prior_loss (0: no prior term, as measured before it existed)",
    )
    p.add_argument("--target-dim", type=int, help="the blocks' model.target_dim (default: d_model)")
    p.add_argument("--block", default="two_stream", choices=["two_stream", "stream"], help="the blocks' model.block")
    p.add_argument("--sigma-free", action="store_true", help="with --block stream: model.time_conditioning false")
    p.add_argument(
        "--host-mmap-threshold",
        type=int,
        default=65536,
        help="train.host_mmap_threshold of every job (bytes; 0 = glibc's default malloc, as before the field)",
    )
    p.add_argument(
        "--out", help="file name in bench/results/ (default: throughput_<shape>[_noisy<f>][_prior<w>][_e<dim>].json)"
    )
    args = parse_or_measure(p, measure_job)
    if args is None:
        return 0
    if args.steps < 2:
        p.error("--steps must be >= 2 (the first step is not timed)")
    shape = "quick" if args.quick else "full"
    base = {"shape": shape, "micro_batch": args.micro_batch, "steps": args.steps}
    base["host_mmap_threshold"] = args.host_mmap_threshold
    # The end-to-end job takes the same switches where they apply to it (the target-table ones do not).
    e2e_level = args.level if args.level in E2E_LEVELS else E2E_LEVELS[-1]
    e2e = run_worker(__file__, {**base, "B": 1, "level": e2e_level})
    blocks = [
        run_worker(
            __file__,
            {
                **base,
                "B": args.blocks,
                "level": args.level,
                "block": b,
                "noisy_fraction": args.noisy_fraction,
                "prior_loss": args.prior_loss,
                "model": ({"target_dim": args.target_dim} if args.target_dim else {})
                | {"block": args.block, "time_conditioning": not args.sigma_free},
            },
        )
        for b in range(args.blocks)
    ]
    total = sum(b["step_s"] for b in blocks)
    total_flops = sum(b["flops_per_step"] for b in blocks)
    ceiling = matmul_peak_flops()
    datasheet = datasheet_peak_flops()
    print(
        f"\nLlama family, shape '{shape}', micro-batch {args.micro_batch}, {e2e['dtype']}, level '{args.level}', "
        f"noisy fraction {args.noisy_fraction}, prior loss {args.prior_loss}, target dim {args.target_dim or 'd'}"
    )
    print(
        f"FLOPs counted per training step (forward + backward); this device's {ceiling['n']}^3 {ceiling['dtype']} "
        f"product: {ceiling['flops_per_s'] / 1e12:.3f} TFLOP/s"
        + (f"; MFU against the datasheet's {datasheet / 1e12:.0f} TFLOP/s" if datasheet else "")
    )
    header = f"{'job':>10} {'layers':>6} {'step s':>8} {'tokens/s':>10} {'vs e2e':>7} {'GFLOP':>9} {'vs e2e':>7}"
    print(header + f" {'TFLOP/s':>8} {'of product':>10}" + (f" {'MFU':>6}" if datasheet else ""))

    def row(name, r, step_s, flops, tokens):
        rate = flops / step_s
        line = f"{name:>10} {r:>6} {step_s:8.3f} {tokens:>10} {step_s / e2e['step_s']:7.2f} {flops / 1e9:9.1f} "
        line += f"{flops / e2e['flops_per_step']:7.2f} {rate / 1e12:8.3f} {rate / ceiling['flops_per_s']:10.1%}"
        return line + (f" {rate / datasheet:6.1%}" if datasheet else "")

    for name, r in [("e2e", e2e)] + [(f"block {b}", r) for b, r in enumerate(blocks)]:
        print(row(name, r["layers"], r["step_s"], r["flops_per_step"], f"{r['tokens_per_s']:,.0f}"))
    print(row("sum", sum(b["layers"] for b in blocks), total, total_flops, ""))
    suffix = "" if args.noisy_fraction == 1 else f"_noisy{args.noisy_fraction:g}"
    suffix += "" if args.prior_loss == 1 else f"_prior{args.prior_loss:g}"
    suffix += f"_e{args.target_dim}" if args.target_dim else ""
    suffix += ("" if args.block == "two_stream" else f"_{args.block}") + ("_sigma_free" if args.sigma_free else "")
    suffix += f"_mmap{args.host_mmap_threshold // 1024}k" if args.host_mmap_threshold else ""  # (0: the files before)
    path = write_results(
        args.out or f"throughput_{shape}{suffix}.json",
        {
            "shape": shape,
            "B": args.blocks,
            "noisy_fraction": args.noisy_fraction,
            "prior_loss": args.prior_loss,
            "target_dim": args.target_dim,
            "block": args.block,
            "sigma_free": args.sigma_free,
            "e2e": e2e,
            "blocks": blocks,
            "sum_block_step_s": total,
            "sum_over_e2e": total / e2e["step_s"],
            "sum_block_flops_per_step": total_flops,
            "flops_sum_over_e2e": total_flops / e2e["flops_per_step"],
            "matmul_peak": ceiling,
            "datasheet_peak_flops_per_s": datasheet,
            "mfu": (
                {"e2e": e2e["flops_per_s"] / datasheet, "blocks": [b["flops_per_s"] / datasheet for b in blocks]}
                if datasheet
                else None
            ),
        },
    )
    print(f"[throughput] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
