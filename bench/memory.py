"""Training memory of one DiffusionBlocks block job vs the end-to-end job, measured, with each memory switch.

    python bench/memory.py --family llama --quick                 # seconds per job
    python bench/memory.py --family llama --micro-batch 4         # the paper's shape (12 x 768, seq 256, 32K)

For B in {1 (end-to-end), 2, 3, 4, 6} and each cumulative switch level (see bench/common.py LEVELS:
paper -> +chunked CE -> +activation checkpointing -> +target-table head -> +target-table context), one
fresh process per job measures parameter, gradient and optimizer bytes, saved-activation bytes of one step
and the peak (CUDA peak on a GPU, peak RSS rise on CPU). The table gives each block job's share of the
end-to-end job at the same switch level and at the paper level, next to the ideal 1/B.
Writes bench/results/memory_<family>_<shape>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    E2E_LEVELS,
    LEVELS,
    MEMORY_BENCH,
    measure_job,
    mib,
    parse_or_measure,
    results_path,
    run_worker,
    write_results,
)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="llama", choices=["llama", "masked", "huginn"])
    p.add_argument("--quick", action="store_true", help="a small shape (same depth, d=192, vocab 8000, seq 128)")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--blocks", default="1,2,3,4,6", help="values of B; 1 = the end-to-end job")
    p.add_argument("--levels", default=",".join(LEVELS), help=f"switch levels, from {list(LEVELS)}")
    p.add_argument("--steps", type=int, default=2, help="training steps per job (>= 2; the second is measured)")
    p.add_argument("--fresh", action="store_true", help="measure every row again (default: resume)")
    p.add_argument("--target-dim", type=int, help="the blocks' model.target_dim (default: d_model)")
    p.add_argument(
        "--context-embedding",
        choices=["learned", "target"],
        help="the blocks' model.context_embedding at every level ('target': read from the frozen table)",
    )
    p.add_argument(
        "--block",
        choices=["two_stream", "stream"],
        help="the blocks' model.block ('stream': the single-stream block, docs/METHOD.md 5c)",
    )
    p.add_argument("--sigma-free", action="store_true", help="with --block stream: model.time_conditioning false")
    p.add_argument(
        "--host-mmap-threshold",
        type=int,
        default=65536,
        help="train.host_mmap_threshold of every job (bytes; 0 = glibc's default malloc, as before the field)",
    )
    args = parse_or_measure(p, measure_job)
    if args is None:
        return 0
    bench = MEMORY_BENCH.get(args.family)
    if bench is None:
        p.error(
            f"the '{args.family}' family is not measured here (the Huginn family's memory, the baseline per BPTT "
            "length k vs the diffusion core, is measured by bench/huginn.py)"
        )
    levels = [v for v in args.levels.split(",") if v and v in bench["levels"]]
    if set(levels) - set(LEVELS) or args.steps < 2:
        p.error(f"--levels must come from {list(LEVELS)} (got {levels}) and --steps must be >= 2")
    shape = "quick" if args.quick else "full"
    model_keys = {"target_dim": args.target_dim} if args.target_dim else {}
    if args.context_embedding:
        model_keys["context_embedding"] = args.context_embedding
    if args.block:
        model_keys["block"] = args.block
    if args.sigma_free:
        model_keys["time_conditioning"] = False
    suffix = (f"_e{args.target_dim}" if args.target_dim else "") + (
        f"_context_{args.context_embedding}" if args.context_embedding else ""
    )
    suffix += (f"_{args.block}" if args.block and args.block != "two_stream" else "") + (
        "_sigma_free" if args.sigma_free else ""
    )
    suffix += f"_mmap{args.host_mmap_threshold // 1024}k" if args.host_mmap_threshold else ""  # (0: the files before)
    name = f"memory_{args.family}_{shape}{suffix}.json"
    # Resumable: rows already measured at this shape and micro-batch are kept (a full-shape run is long on CPU).
    done = {}
    previous = results_path(name)
    if previous.is_file() and not args.fresh:
        old = json.loads(previous.read_text())
        if old.get("micro_batch") == args.micro_batch:
            done = {(r["B"], r["level"]): r for r in old["rows"]}

    def save(rows):
        return write_results(
            name,
            {
                "family": args.family,
                "shape": shape,
                "micro_batch": args.micro_batch,
                "target_dim": args.target_dim,
                "context_embedding": args.context_embedding,
                "block": args.block or "two_stream",
                "sigma_free": args.sigma_free,
                "host_mmap_threshold": args.host_mmap_threshold,
                "levels": LEVELS,
                "rows": rows,
            },
        )

    for B in [int(b) for b in args.blocks.split(",")]:
        for level in levels:
            if (B == 1 and level not in bench["e2e_levels"]) or (B, level) in done:
                continue
            spec = {"shape": shape, "B": B, "level": level, "micro_batch": args.micro_batch, "steps": args.steps}
            spec["family"] = args.family
            spec["host_mmap_threshold"] = args.host_mmap_threshold
            spec["model"] = model_keys
            r = run_worker(__file__, spec)
            done[(B, level)] = r
            save(list(done.values()))
            print(
                f"[memory] B={B} {level:>14}: states+activations {mib(r['state_plus_activation_bytes'])} MiB, "
                f"peak {mib(r['peak_bytes'])} MiB, {r['step_s']:.2f} s/step",
                flush=True,
            )
    order = {level: i for i, level in enumerate(LEVELS)}
    rows = sorted(done.values(), key=lambda r: (r["B"], order[r["level"]]))
    e2e = {r["level"]: r for r in rows if r["B"] == 1}
    print(
        f"\n{args.family} family, shape '{shape}', micro-batch {args.micro_batch}, {rows[0]['dtype']}; MiB; "
        "ratio = block / e2e"
    )
    head = f"{'B':>2} {'level':>14} {'params':>7} {'grads':>7} {'optim':>7} {'saved act':>9} {'total':>7} {'peak':>7}"
    print(head + f" {'vs e2e same level':>17} {'vs e2e paper':>12} {'ideal':>6}")
    for r in rows:
        same = e2e.get(r["level"]) or e2e.get(E2E_LEVELS[-1]) or e2e.get("checkpointing")
        paper = e2e.get("paper")
        ratio = lambda ref, r=r: f"{r['peak_bytes'] / ref['peak_bytes']:.3f}" if ref else "-"  # noqa: E731
        print(
            f"{r['B']:>2} {r['level']:>14} {mib(r['parameter_bytes']):>7} {mib(r['gradient_bytes']):>7} "
            f"{mib(r['optimizer_bytes']):>7} {mib(r['saved_activation_bytes']):>9} "
            f"{mib(r['state_plus_activation_bytes']):>7} {mib(r['peak_bytes']):>7} {ratio(same):>17} "
            f"{ratio(paper):>12} {1 / r['B']:>6.3f}"
        )
        if same:
            r["ratio_vs_e2e_same_level"] = r["peak_bytes"] / same["peak_bytes"]
        if paper:
            r["ratio_vs_e2e_paper"] = r["peak_bytes"] / paper["peak_bytes"]
    path = save(rows)
    print(f"[memory] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
