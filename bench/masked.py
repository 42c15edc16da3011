"""Masked family, DiffusionBlocks vs end-to-end at equal training compute: bits per character and sampling speed.

    python bench/masked.py                         # tiny recipe on the bundled speeches, text8-style (~15 min here)
    python bench/masked.py --steps 100 --bpc-windows 32 --out bench/results/masked_smoke.json

Trains the B blocks and the end-to-end baseline of one run for the same number of steps (each block runs L/B
layers per step, the baseline L: equal layer-updates), merges both and reports
- BPC on the same validation windows: the NELBO summed over the blocks' t-slices vs over [0, 1] for the
  baseline, each with its Monte Carlo standard error, the number of windows and of t samples;
- sampling speed of the merged model vs the baseline at the same number of ancestral steps (steps/s and the
  ratio; each step runs L/B layers instead of L, so about B times faster is the expectation);
- wall time of every job.
Resumes: finished jobs are not retrained. Writes bench/results/masked.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}


def sh(*args: str) -> float:
    print("$", " ".join(args), flush=True)
    t0 = time.time()
    subprocess.run(args, cwd=ROOT, env=ENV, check=True)
    return time.time() - t0


def final_val(job_dir: Path) -> dict:
    from dbscale.train.metrics import read_metrics

    vals = [e for e in read_metrics(job_dir / "metrics.jsonl") if e["event"] == "val"]
    return {"val_nelbo_nats": vals[-1]["val_loss"], "val_masked_ce": vals[-1]["val_ce"]} if vals else {}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/mdm_tiny.yaml")
    p.add_argument("--run", default="runs/bench_masked")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps of every job")
    p.add_argument("--bpc-windows", type=int, default=128)
    p.add_argument("--t-samples", type=int, default=8, help="t samples per block and window")
    p.add_argument("--sample-steps", type=int, default=128)
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3, help="timed sampling repeats (the median is reported)")
    p.add_argument("--out", default="bench/results/masked.json")
    args = p.parse_args()

    import torch

    from dbscale import families
    from dbscale.eval.likelihood import masked_bpc
    from dbscale.merge import load_merged
    from dbscale.run import open_run

    run_dir = ROOT / args.run
    common = ["--set", f"train.steps={args.steps}", "--set", f"train.val_every={args.steps}"]
    common += ["--set", f"train.save_every={args.steps}"]
    sh(PY, "tools/prepare.py", "--config", args.config, "--run", str(run_dir))
    run = open_run(run_dir)
    if families.get(run.config.model.family).generates != "sequence":
        p.error(f"{args.config} is not a masked-family config")
    wall = {}
    for b in range(run.num_blocks):
        wall[f"block {b}"] = sh(PY, "launchers/train_block.py", "--run", str(run_dir), "--block", str(b), *common)
    wall["e2e"] = sh(PY, "launchers/train_e2e.py", "--run", str(run_dir), *common)
    sh(PY, "tools/merge_blocks.py", "--run", str(run_dir), "--allow-unfinished")
    sh(PY, "tools/merge_blocks.py", "--run", str(run_dir), "--e2e", "--allow-unfinished")

    torch.set_num_threads(os.cpu_count() or 1)
    windows = run.shards("val").fixed_windows(args.bpc_windows, run.config.model.seq_len, seed=12345)
    rows = {}
    for label, rel in (("DiffusionBlocks", "merged"), ("end-to-end", "e2e/merged")):
        model, _, manifest = load_merged(run_dir / rel)
        t0 = time.time()
        bpc = masked_bpc(model, windows, num_t=args.t_samples, seed=0)
        bpc_s = time.time() - t0
        model.sample(1, run.config.model.seq_len, steps=max(8, model.num_blocks), seed=0)  # warm-up
        times = []
        for r in range(args.repeats):
            t0 = time.time()
            model.sample(args.num_samples, run.config.model.seq_len, steps=args.sample_steps, seed=r)
            times.append(time.time() - t0)
        times.sort()
        jobs = [f"block {b}" for b in range(run.num_blocks)] if label == "DiffusionBlocks" else ["e2e"]
        rows[label] = {
            "bpc": bpc["bits_per_token"],
            "bpc_stderr": bpc["stderr"],
            "bpc_eval_s": round(bpc_s, 1),
            "layers_per_step": run.config.model.n_layers // model.num_blocks,
            "sampling_steps_per_s": args.sample_steps / times[len(times) // 2],
            "train_wall_s": {j: round(wall[j], 1) for j in jobs},
            "final_val": {j: final_val(run.job_dir(None if j == "e2e" else int(j.split()[1]))) for j in jobs},
            "num_parameters": manifest["num_parameters"],
        }
    ratio = rows["DiffusionBlocks"]["sampling_steps_per_s"] / rows["end-to-end"]["sampling_steps_per_s"]
    out = {
        "config": args.config,
        "steps_per_job": args.steps,
        "num_blocks": run.num_blocks,
        "bpc_windows": args.bpc_windows,
        "window_chars": run.config.model.seq_len,
        "t_samples_per_block": args.t_samples,
        "t_min": run.config.diffusion.t_min,
        "sample_steps": args.sample_steps,
        "num_samples": args.num_samples,
        "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "sampling_speed_ratio": ratio,
        "models": rows,
    }
    (ROOT / args.out).parent.mkdir(parents=True, exist_ok=True)
    (ROOT / args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\n{'model':>16} {'BPC':>7} {'+-':>6} {'layers/step':>12} {'steps/s':>8} {'train wall s':>14}")
    for label, row in rows.items():
        train_s = sum(row["train_wall_s"].values())
        print(
            f"{label:>16} {row['bpc']:7.3f} {row['bpc_stderr']:6.3f} {row['layers_per_step']:>12} "
            f"{row['sampling_steps_per_s']:8.1f} {train_s:14.0f}"
        )
    print(f"sampling speed ratio (blocks / end-to-end, {args.sample_steps} steps): {ratio:.2f}x")
    print(f"[masked] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
