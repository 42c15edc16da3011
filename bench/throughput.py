"""Training throughput of each block job vs the end-to-end job, on this machine, in one run.

    python bench/throughput.py --quick                   # seconds per job
    python bench/throughput.py --blocks 4 --micro-batch 4  # the paper's shape

Each job runs in its own process (bench/common.py): the end-to-end LlamaLM with L layers, then every block
b of B with its L/B layers (AdaLN, the doubled clean + noisy sequence). Reports median step time and
training tokens/s of each, and the sum of the block jobs' step times, which is what training all blocks
costs in machine time (when the blocks run one after another on one machine; on B machines the wall time is
the slowest block's). Writes bench/results/throughput_<shape>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import E2E_LEVELS, LEVELS, measure_job, run_worker, write_results  # noqa: E402


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
    p.add_argument(
        "--out", help="file name in bench/results/ (default: throughput_<shape>[_noisy<f>][_prior<w>][_e<dim>].json)"
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(measure_job(json.loads(args.worker))))
        return 0
    if args.steps < 2:
        p.error("--steps must be >= 2 (the first step is not timed)")
    shape = "quick" if args.quick else "full"
    base = {"shape": shape, "micro_batch": args.micro_batch, "steps": args.steps}
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
                "model": {"target_dim": args.target_dim} if args.target_dim else {},
            },
        )
        for b in range(args.blocks)
    ]
    total = sum(b["step_s"] for b in blocks)
    print(
        f"\nLlama family, shape '{shape}', micro-batch {args.micro_batch}, {e2e['dtype']}, level '{args.level}', "
        f"noisy fraction {args.noisy_fraction}, prior loss {args.prior_loss}, target dim {args.target_dim or 'd'}"
    )
    print(f"{'job':>10} {'layers':>6} {'step s':>8} {'tokens/s':>10} {'vs e2e':>7}")
    print(f"{'e2e':>10} {e2e['layers']:>6} {e2e['step_s']:8.3f} {e2e['tokens_per_s']:10,.0f} {1:7.2f}")
    for b, r in enumerate(blocks):
        ratio = r["step_s"] / e2e["step_s"]
        print(f"{'block ' + str(b):>10} {r['layers']:>6} {r['step_s']:8.3f} {r['tokens_per_s']:10,.0f} {ratio:7.2f}")
    print(f"{'sum':>10} {sum(b['layers'] for b in blocks):>6} {total:8.3f} {'':>10} {total / e2e['step_s']:7.2f}")
    suffix = "" if args.noisy_fraction == 1 else f"_noisy{args.noisy_fraction:g}"
    suffix += "" if args.prior_loss == 1 else f"_prior{args.prior_loss:g}"
    suffix += f"_e{args.target_dim}" if args.target_dim else ""
    path = write_results(
        args.out or f"throughput_{shape}{suffix}.json",
        {
            "shape": shape,
            "B": args.blocks,
            "noisy_fraction": args.noisy_fraction,
            "prior_loss": args.prior_loss,
            "target_dim": args.target_dim,
            "e2e": e2e,
            "blocks": blocks,
            "sum_block_step_s": total,
            "sum_over_e2e": total / e2e["step_s"],
        },
    )
    print(f"[throughput] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
