"""Which sampler should a DiffusionBlocks chain use? Every estimate x step on one trained chain, side by side.

    python bench/chain_sampler.py --run runs/demo                 # a run with merged/ and e2e/merged/
    python bench/chain_sampler.py --run runs/demo --num-prompts 32 --samplers mean/euler,sample/ancestral

Estimates (what a step hands on, dbscale/diffusion/sampler.py): mean (the paper: softmax(logits) @ E), argmax
(Diffusion-LM's clamping), sample (a token drawn at the evaluation temperature / top-p). Steps: euler (the
paper's deterministic step) and ancestral (the forward process's posterior). One tools/evaluate.py protocol
call scores every sampler and the end-to-end baseline on the same prompts, seeds and references: MAUVE
(MiniLM features), generative perplexity under the baseline, held-out greedy and sampling accuracy, distinct
4-grams. Writes bench/results/chain_sampler.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SAMPLERS = tuple(f"{e}/{s}" for e in ("mean", "argmax", "sample") for s in ("euler", "ancestral"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--samplers", default=",".join(SAMPLERS))
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--samples-per-prompt", type=int, default=2)
    p.add_argument("--out", default="bench/results/chain_sampler.json")
    args = p.parse_args()
    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    for s in samplers:
        if s not in SAMPLERS:
            p.error(f"unknown sampler '{s}'; choose from {', '.join(SAMPLERS)}")
    from bench.common import device_info
    from dbscale.eval.protocol import EvalSettings, evaluate, format_table

    run = Path(args.run)
    specs = [(run / "merged", dict(zip(("estimate", "step"), s.split("/"), strict=True))) for s in samplers]
    settings = EvalSettings(num_prompts=args.num_prompts, samples_per_prompt=args.samples_per_prompt)
    report = evaluate([*specs, run / "e2e/merged"], run, settings, log=lambda m: print(m, file=sys.stderr))
    print(format_table(report))
    report["device_info"] = device_info()
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
