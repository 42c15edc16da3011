"""Autoregressive rows for the masked family's bits-per-character table: the Llama family on the same characters.

    python bench/text8_ar.py                      # configs/mdm_tiny.yaml's data and shape, 400 steps per job
    python bench/text8_ar.py --steps 100 --windows 32 --out bench/results/text8_ar_smoke.json

The masked bench (bench/masked.py) scores a masked-diffusion model's NELBO in bits per character; the standard
reading of such a figure is against an autoregressive model of the same size on the same text (MD4's text8 table
carries AR transformer rows beside its diffusion rows). This bench prepares Llama-family runs from the masked
recipe's config with only the family changed (same data section, so the same deterministic split and the same
27-character tokenizer; same layers, width, context, steps and batch: equal layer-updates), trains the
end-to-end causal LM and a B-block chain for each block layout, and reports on held-out windows
- the end-to-end LM's exact likelihood: mean cross-entropy of characters 2..T+1 of each (T+1)-character window,
  in bits, with its standard error over windows;
- for a chain (whose last step is one-hot, so it has no likelihood): block 0's context-only cross-entropy in bits
  (block 0 at sigma_max read as a language model of L/B layers) and the chain's sample accuracy.
Resumes: finished jobs are not retrained. Writes bench/results/text8_ar.json.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

from dbscale import families

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
LAYOUTS = {
    "two_stream": [],
    "stream_sigma_free": ["--set", "model.block=stream", "--set", "model.time_conditioning=false"],
}


def sh(*args: str) -> float:
    print("$", " ".join(args), flush=True)
    t0 = time.time()
    subprocess.run(args, cwd=ROOT, env=ENV, check=True)
    return time.time() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/mdm_tiny.yaml", help="the masked recipe whose data and shape to use")
    p.add_argument("--run", default="runs/bench_text8_ar", help="run directories: <run>_<layout>")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps of every job")
    p.add_argument("--windows", type=int, default=128, help="held-out windows")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help=f"block layouts, of {list(LAYOUTS)}")
    p.add_argument("--out", default="text8_ar.json", help="file name in bench/results/")
    args = p.parse_args()
    layouts = args.layouts.split(",")
    if any(x not in LAYOUTS for x in layouts):
        p.error(f"--layouts: choose from {list(LAYOUTS)}")

    import numpy as np
    import torch

    from dbscale.files import sha256_file
    from dbscale.generate import heldout_metrics
    from dbscale.merge import load_merged
    from dbscale.run import open_run

    common = ["--set", f"train.steps={args.steps}", "--set", f"train.val_every={args.steps}"]
    common += ["--set", f"train.save_every={args.steps}", "--set", "model.family=llama"]
    rows, wall, first = [], {}, None
    for layout in layouts:
        run_dir = (ROOT / f"{args.run}_{layout}").resolve()
        sh(PY, "tools/prepare.py", "--config", args.config, "--run", str(run_dir), *common, *LAYOUTS[layout])
        run = open_run(run_dir)
        for b in range(run.num_blocks):
            wall[f"{layout} block {b}"] = sh(PY, "launchers/train_block.py", "--run", str(run_dir), "--block", str(b))
        sh(PY, "tools/merge_blocks.py", "--run", str(run_dir))
        if first is None:  # the baseline does not depend on the block layout: train it once
            first = run_dir
            wall["e2e"] = sh(PY, "launchers/train_e2e.py", "--run", str(run_dir))
            sh(PY, "tools/merge_blocks.py", "--run", str(run_dir), "--e2e")
        T = run.config.model.seq_len
        windows = run.shards("val").fixed_windows(args.windows, T + 1, seed=12345)
        torch.set_num_threads(os.cpu_count() or 1)
        chain, _, manifest = load_merged(run_dir / "merged")
        figures = heldout_metrics(chain, windows, batch_size=16)
        rows.append(
            {
                "model": f"DiffusionBlocks chain, B={run.num_blocks}, {layout}",
                "block0_context_only_bits_per_char": figures["first_step_ce"] / math.log(2),
                "sample_accuracy": figures["sample_accuracy"],
                "greedy_accuracy": figures["accuracy"],
                "layers_per_block": families.layer_allocation(run.config),
                "num_parameters": manifest["num_parameters"],
                "run": os.path.relpath(run_dir, ROOT),
                "val_shards_sha256": [sha256_file(f) for f in sorted((run_dir / "data").glob("val*"))],
            }
        )
    e2e, _, manifest = load_merged(first / "e2e/merged")
    windows = open_run(first).shards("val").fixed_windows(args.windows, T + 1, seed=12345)
    per_window = []
    with torch.no_grad():
        for i in range(0, len(windows), 16):
            w = torch.from_numpy(np.asarray(windows[i : i + 16], dtype=np.int64))
            per_window += e2e(w[:, :-1], targets=w[:, 1:]).mean(dim=1).div(math.log(2)).tolist()
    figures = heldout_metrics(e2e, windows, batch_size=16)
    rows.insert(
        0,
        {
            "model": f"end-to-end causal LM, {e2e.cfg.n_layers} layers",
            "bits_per_char": float(np.mean(per_window)),
            "bits_per_char_stderr": float(np.std(per_window, ddof=1) / math.sqrt(len(per_window))),
            "sample_accuracy": figures["sample_accuracy"],
            "greedy_accuracy": figures["accuracy"],
            "num_parameters": manifest["num_parameters"],
            "run": os.path.relpath(first, ROOT),
        },
    )
    path = write_results(
        args.out,
        {
            "config": args.config,
            "overrides": "model.family=llama (+ the layout's model.block settings)",
            "steps_per_job": args.steps,
            "windows": args.windows,
            "window_chars": T + 1,
            "scored_chars_per_window": T,
            "train_wall_s": {k: round(v, 1) for k, v in wall.items()},
            "rows": rows,
        },
    )
    print(f"\n{'model':>44} {'bits/char':>10} {'sample acc':>10} {'greedy acc':>10}")
    for r in rows:
        bits = r.get("bits_per_char", r.get("block0_context_only_bits_per_char"))
        note = "" if "bits_per_char" in r else " (block 0 alone)"
        print(f"{r['model']:>44} {bits:10.3f} {r['sample_accuracy']:10.3f} {r['greedy_accuracy']:10.3f}{note}")
    print(f"[text8_ar] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
