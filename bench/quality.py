"""Quality of DiffusionBlocks vs the end-to-end baseline at equal layer-updates, on the bundled corpus.

    python bench/quality.py                      # the demo recipe, 400 steps per job (about 15 minutes here)
    python bench/quality.py --minutes 45         # as many steps as fit in 45 minutes (calibrated)

Every block and the baseline get the same number of steps, so the total layer-updates are equal
(B jobs x L/B layers = L layers, METHOD.md section 8). Trains through the real launchers, merges, runs
tools/evaluate.py with --compare, prints the table and writes bench/results/quality.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}


def sh(*args: str) -> None:
    print("$", " ".join(args), flush=True)
    subprocess.run(args, cwd=ROOT, env=ENV, check=True)


def step_time(run: Path, job: str) -> float:
    from dbscale.train.metrics import read_metrics

    times = sorted(e["step_time_s"] for e in read_metrics(run / job / "metrics.jsonl") if e["event"] == "train")
    return times[len(times) // 2]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/llama_tiny.yaml")
    p.add_argument("--run", default="runs/quality")
    p.add_argument("--steps", type=int, default=400, help="steps per job (ignored with --minutes)")
    p.add_argument("--minutes", type=float, help="wall-time budget for training; steps are calibrated to fit")
    p.add_argument("--num-prompts", type=int, default=64)
    args = p.parse_args()
    t0 = time.time()
    run = ROOT / args.run
    sh(PY, "tools/prepare.py", "--config", args.config, "--run", str(run))
    from dbscale.run import open_run

    r = open_run(run)
    B, warmup = r.num_blocks, r.config.train.warmup_steps
    steps = args.steps
    if args.minutes:
        calib = max(1, min(20, warmup))  # inside warm-up: the LR does not depend on the final step count
        for job in [*(["launchers/train_block.py", "--block", str(b)] for b in range(B)), ["launchers/train_e2e.py"]]:
            sh(PY, job[0], "--run", str(run), *job[1:], "--set", f"train.steps={calib}", "--set", "train.log_every=1")
        per_step = sum(step_time(run, f"blocks/{b}") for b in range(B)) + step_time(run, "e2e")
        budget = args.minutes * 60 - (time.time() - t0) - 15 * (B + 1)  # job start-up
        steps = max(calib + 1, int(budget / per_step))
        print(f"[quality] {per_step:.3f}s per step over all jobs -> {steps} steps per job", flush=True)
    common = [
        "--set",
        f"train.steps={steps}",
        "--set",
        f"train.val_every={steps}",
        "--set",
        f"train.save_every={steps}",
    ]
    for b in range(B):
        sh(PY, "launchers/train_block.py", "--run", str(run), "--block", str(b), *common)
    sh(PY, "launchers/train_e2e.py", "--run", str(run), *common)
    train_s = time.time() - t0
    sh(PY, "tools/merge_blocks.py", "--run", str(run), "--allow-unfinished")
    sh(PY, "tools/merge_blocks.py", "--run", str(run), "--e2e", "--allow-unfinished")
    out = ROOT / "bench/results/quality.json"
    sh(
        PY,
        "tools/evaluate.py",
        "--model",
        str(run / "merged"),
        "--compare",
        str(run / "e2e/merged"),
        "--data",
        str(run),
        "--num-prompts",
        str(args.num_prompts),
        "--out",
        str(out),
    )
    report = json.loads(out.read_text())
    report["bench"] = {
        "config": args.config,
        "steps_per_job": steps,
        "num_blocks": B,
        "layers_per_block": r.config.layer_allocation(),
        "train_wall_s": round(train_s, 1),
        "total_wall_s": round(time.time() - t0, 1),
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    from dbscale.eval.protocol import format_table

    print(format_table(report))
    total_min = (time.time() - t0) / 60
    print(f"[quality] {steps} steps per job; training {train_s / 60:.1f} min, total {total_min:.1f} min; {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
