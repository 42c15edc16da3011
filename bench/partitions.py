"""Which noise partition fits token targets? Each candidate trained at equal layer-updates, side by side.

    python bench/partitions.py                       # demo recipe, 400 steps per job (about 45 minutes here)
    python bench/partitions.py --variants paper,ce_levels --steps 200

Variants (each a fresh run of the same config and data):
  paper          the paper's equi-probability partition of EDM's log-normal (P_mean -1.2, P_std 1.2)
  ce_levels      boundaries at equal steps of the measured CE(sigma) curve (tools/calibrate_noise.py)
  loss_integral  boundaries at equal quantiles of the integral of CE(sigma) under the log-normal
  lognormal      equi-probability partition of a log-normal moved onto the measured CE transition
The end-to-end baseline is trained once (in the 'paper' run). Reports per-block final validation loss,
teacher-forced held-out CE and greedy accuracy of the chain, MAUVE (MiniLM features) of sampled
continuations (all models see the same prompts, seeds and references) and wall time. Writes
bench/results/partitions.json.
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
VARIANTS = ("paper", "ce_levels", "loss_integral", "lognormal")


def sh(*args: str) -> None:
    print("$", " ".join(args), flush=True)
    subprocess.run(args, cwd=ROOT, env=ENV, check=True)


def final_val(run: Path, job: str) -> float | None:
    from dbscale.train.metrics import read_metrics

    vals = [e["val_ce"] for e in read_metrics(run / job / "metrics.jsonl") if e["event"] == "val"]
    return vals[-1] if vals else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/llama_tiny.yaml")
    p.add_argument("--root", default="runs/bench_partitions")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=400, help="steps per job")
    p.add_argument("--calibration-steps", type=int, default=200)
    p.add_argument("--num-prompts", type=int, default=48)
    p.add_argument("--out", default="bench/results/partitions.json")
    args = p.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    if "paper" not in variants:
        variants.insert(0, "paper")  # it holds the baseline
    root = ROOT / args.root
    common = ["--set", f"train.steps={args.steps}", "--set", f"train.val_every={args.steps}"]
    common += ["--set", f"train.save_every={args.steps}"]
    from dbscale.run import open_run

    rows = {}
    for name in variants:
        t0 = time.time()
        run = root / name
        # every variant starts from the paper's partition; the calibrated ones are then calibrated explicitly
        sh(
            PY,
            "tools/prepare.py",
            "--config",
            args.config,
            "--run",
            str(run),
            "--set",
            "diffusion.partition=equiprobable",
        )
        calibrated = json.loads((run / "manifest.json").read_text()).get("calibration", {}).get("method")
        if name != "paper" and calibrated != name:  # (a rerun resumes: the run is calibrated already)
            steps = str(args.calibration_steps)
            sh(PY, "tools/calibrate_noise.py", "--run", str(run), "--method", name, "--steps", steps)
        r = open_run(run)
        calib_s = time.time() - t0
        for b in range(r.num_blocks):
            sh(PY, "launchers/train_block.py", "--run", str(run), "--block", str(b), *common)
        sh(PY, "tools/merge_blocks.py", "--run", str(run), "--allow-unfinished")
        rows[name] = {
            "boundaries": r.manifest["partition"]["sigma_boundaries"],
            "block_val_ce": [final_val(run, f"blocks/{b}") for b in range(r.num_blocks)],
            "calibration_s": round(calib_s, 1),
            "wall_s": round(time.time() - t0, 1),
        }
    base = root / "paper"
    t0 = time.time()
    sh(PY, "launchers/train_e2e.py", "--run", str(base), *common)
    sh(PY, "tools/merge_blocks.py", "--run", str(base), "--e2e", "--allow-unfinished")
    e2e_s = time.time() - t0

    from dbscale.eval.protocol import EvalSettings, evaluate
    from dbscale.generate import chain_diagnostics
    from dbscale.merge import load_merged

    settings = EvalSettings(num_prompts=args.num_prompts)
    dirs = [str(root / n / "merged") for n in variants] + [str(base / "e2e/merged")]
    report = evaluate(dirs, base, settings)
    base_run = open_run(base)
    windows = base_run.shards("val").fixed_windows(16, base_run.config.model.seq_len + 1, seed=5)
    for name, result in zip([*variants, "e2e"], report["results"], strict=True):
        row = rows.setdefault(name, {"block_val_ce": [final_val(base, "e2e")], "wall_s": round(e2e_s, 1)})
        row.update(
            heldout_ce=result["heldout"]["ce"],  # a plain LM's; None for a chain (its last step is one-hot)
            first_step_ce=result["heldout"].get("first_step_ce"),  # a chain's block 0 from the context alone
            heldout_accuracy=result["heldout"]["accuracy"],
            sample_accuracy=result["heldout"]["sample_accuracy"],
            mauve=result["mauve"]["mauve"],
            gen_ppl=result.get("generative_perplexity"),
        )
        if name != "e2e":
            model, _, _ = load_merged(root / name / "merged")
            row["chain"] = chain_diagnostics(model, windows)
    out = {
        "config": args.config,
        "steps_per_job": args.steps,
        "settings": report.get("settings"),
        "mauve_note": "MAUVE (MiniLM features): not comparable to gpt2-large MAUVE",
        "variants": rows,
    }
    (ROOT / args.out).parent.mkdir(parents=True, exist_ok=True)
    (ROOT / args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\n{'variant':>14} {'boundaries (inner)':>28} {'block val CE':>28} {'CE*':>7} {'acc':>6} {'MAUVE':>6}")
    for name, row in rows.items():
        inner = ", ".join(f"{b:.3f}" for b in row.get("boundaries", [0, 0])[1:-1]) or "-"
        vals = ", ".join(f"{v:.2f}" for v in row["block_val_ce"] if v is not None)
        mauve = f"{row['mauve']:.3f}" if row.get("mauve") is not None else "-"
        ce = row["heldout_ce"] if row["heldout_ce"] is not None else row["first_step_ce"]
        print(f"{name:>14} {inner:>28} {vals:>28} {ce:7.2f} {row['heldout_accuracy']:6.3f} {mauve:>6}")
    print("* the baseline's held-out CE; a chain's first step (block 0 from the context alone)")
    print(f"[partitions] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
