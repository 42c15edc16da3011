"""Masked family: does the equal-alpha t-partition fit the task? Alternatives trained at equal compute, by BPC.

    python bench/masked_partitions.py            # after bench/masked.py (reuses its run and baseline), ~10 min here

Variants (each B blocks trained for the same number of steps as in bench/masked.py):
  equal_alpha   the paper's partition: equal decrements of alpha(t) = 1 - t (bench/masked.py's run)
  loss_equal    boundaries at equal quantiles of the NELBO integrand g(t) = w(t) E[sum of masked CE] / T,
                measured with the end-to-end baseline on a t grid (every block carries the same share of the
                bits; in the spirit of CDCD's time warping)
  cosine        equal decrements of MD4's cosine alpha(t) (a different t-split and t distribution per block)
All are scored on the same validation windows with the same t samples (BPC with its standard error).
Writes bench/results/masked_partitions.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}


def sh(*args: str) -> float:
    print("$", " ".join(args), flush=True)
    t0 = time.time()
    subprocess.run(args, cwd=ROOT, env=ENV, check=True)
    return time.time() - t0


def integrand(model, windows, grid, t_min: float, samples: int = 4) -> list[float]:
    """g(t) = w(t) E[sum of masked CE] / T at each t of `grid` (nats per character), by the baseline."""
    import torch

    from dbscale.models.masked import masked_elbo_terms

    block = model.blocks[0]
    g = torch.Generator().manual_seed(0)
    out = []
    with torch.no_grad():
        for t in grid:
            vals = []
            for _ in range(samples):
                u = torch.rand(windows.shape, generator=g)
                tt = torch.full((windows.shape[0],), float(t))
                nelbo, _ = masked_elbo_terms(block, windows, tt, u, model.schedule, 1.0, t_min, model.mask_id)
                vals.append(nelbo.mean().item())
            out.append(float(np.mean(vals)))
    return out


def equal_share_boundaries(grid: list[float], g: list[float], num_blocks: int) -> list[float]:
    """Times where the integral of g (trapezoid on [0, 1], g(0) taken as g(grid[0])) reaches b/B of the total."""
    ts = np.array([0.0, *grid, 1.0])
    gs = np.array([g[0], *g, g[-1]])
    cum = np.concatenate([[0.0], np.cumsum((gs[1:] + gs[:-1]) / 2 * np.diff(ts))])
    inner = [float(np.interp(b / num_blocks * cum[-1], cum, ts)) for b in range(1, num_blocks)]
    return [0.0, *[round(t, 4) for t in inner], 1.0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="runs/bench_masked", help="bench/masked.py's run (its blocks and baseline)")
    p.add_argument("--config", default="configs/mdm_tiny.yaml")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--bpc-windows", type=int, default=128)
    p.add_argument("--t-samples", type=int, default=8)
    p.add_argument("--out", default="bench/results/masked_partitions.json")
    args = p.parse_args()

    import torch

    from dbscale.eval.likelihood import masked_bpc
    from dbscale.merge import load_merged
    from dbscale.run import open_run

    torch.set_num_threads(os.cpu_count() or 1)
    base = ROOT / args.base
    if not (base / "merged/manifest.json").is_file() or not (base / "e2e/merged/manifest.json").is_file():
        p.error(f"{base}: run bench/masked.py first (it trains the equal-alpha blocks and the baseline)")
    run = open_run(base)
    windows = run.shards("val").fixed_windows(args.bpc_windows, run.config.model.seq_len, seed=12345)
    e2e, _, _ = load_merged(base / "e2e/merged", family="masked")
    B = run.num_blocks
    grid = [float(t) for t in np.linspace(0.025, 0.975, 20)]
    calib = run.shards("val").fixed_windows(32, run.config.model.seq_len, seed=777)  # not the scoring windows
    g = integrand(e2e, torch.from_numpy(calib).long(), grid, run.config.diffusion.t_min)
    loss_equal = equal_share_boundaries(grid, g, B)
    print(f"[masked-partitions] g(t) on {len(grid)} points: " + ", ".join(f"{t:.2f}:{v:.2f}" for t, v in zip(grid, g)))
    print(f"[masked-partitions] loss-equalising boundaries: {loss_equal}")

    variants = {
        "equal_alpha": (base, []),
        "loss_equal": (
            ROOT / (args.base + "_loss_equal"),
            ["--set", f"diffusion.t_boundaries={json.dumps(loss_equal)}"],
        ),
        "cosine": (ROOT / (args.base + "_cosine"), ["--set", "diffusion.mask_schedule=cosine"]),
    }
    steps = ["--set", f"train.steps={args.steps}", "--set", f"train.val_every={args.steps}"]
    steps += ["--set", f"train.save_every={args.steps}"]
    rows = {}
    for name, (run_dir, sets) in variants.items():
        wall = 0.0
        if run_dir != base:
            sh(PY, "tools/prepare.py", "--config", args.config, "--run", str(run_dir), *sets)
            for b in range(B):
                wall += sh(PY, "launchers/train_block.py", "--run", str(run_dir), "--block", str(b), *steps)
            sh(PY, "tools/merge_blocks.py", "--run", str(run_dir), "--allow-unfinished")
        model, _, manifest = load_merged(run_dir / "merged", family="masked")
        bpc = masked_bpc(model, windows, num_t=args.t_samples, seed=0)
        rows[name] = {
            "t_intervals": manifest["partition"]["block_intervals"],
            "bpc": bpc["bits_per_token"],
            "bpc_stderr": bpc["stderr"],
            "train_wall_s": round(wall, 1) if wall else None,
        }
    bpc = masked_bpc(e2e, windows, num_t=args.t_samples, seed=0)
    rows["end-to-end"] = {"t_intervals": [[0.0, 1.0]], "bpc": bpc["bits_per_token"], "bpc_stderr": bpc["stderr"]}
    out = {
        "config": args.config,
        "steps_per_job": args.steps,
        "bpc_windows": args.bpc_windows,
        "t_samples_per_block": args.t_samples,
        "integrand_grid": grid,
        "integrand_nats": g,
        "loss_equal_boundaries": loss_equal,
        "variants": rows,
    }
    (ROOT / args.out).parent.mkdir(parents=True, exist_ok=True)
    (ROOT / args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\n{'variant':>12} {'t intervals (block 0 first)':>44} {'BPC':>7} {'+-':>6}")
    for name, row in rows.items():
        iv = ", ".join(f"[{lo:.3f},{hi:.3f}]" for lo, hi in row["t_intervals"])
        print(f"{name:>12} {iv:>44} {row['bpc']:7.3f} {row['bpc_stderr']:6.3f}")
    print(f"[masked-partitions] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
