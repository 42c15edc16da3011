"""Evaluate merged models with the paper's protocol: MAUVE, generative perplexity, held-out likelihood.

    dbscale evaluate --model runs/demo/merged --data runs/demo
    dbscale evaluate --model runs/demo/merged --compare runs/demo/e2e/merged --data runs/demo --out eval.json
    dbscale evaluate --model runs/demo/merged --ensemble runs/lm2_s0/e2e/merged,runs/lm2_s1/e2e/merged --data runs/demo

MAUVE uses the offline all-MiniLM-L6-v2 featurizer by default, labelled "MAUVE (MiniLM features)"; those
scores are not comparable with the gpt2-large MAUVE of papers (--featurizer gpt2-large, needs the hub).
"""

import json
import sys
from pathlib import Path


def add_arguments(p) -> None:
    from dbscale.eval.protocol import EvalSettings

    d = EvalSettings()
    p.add_argument("--model", required=True, help="merged model (R/merged or R/e2e/merged)")
    p.add_argument("--compare", action="append", default=[], help="another merged model, same prompts and seeds")
    p.add_argument(
        "--ensemble",
        action="append",
        default=[],
        metavar="DIR,DIR[,...]",
        help="merged plain LMs (e.g. B shallow baselines trained alone) compared as one model",
    )
    p.add_argument(
        "--ensemble-mode",
        choices=["product", "mixture"],
        default="product",
        help="how --ensemble combines its members: product of experts (mean log-probabilities) or mixture",
    )
    p.add_argument("--data", required=True, help="run directory whose validation split gives prompts and references")
    p.add_argument(
        "--judge",
        help="judge for generative perplexity: a merged dbscale baseline or a local HF causal LM "
        "(default: DATA/e2e/merged when it exists)",
    )
    p.add_argument("--featurizer", choices=["minilm", "gpt2-large"], default=d.featurizer, help="MAUVE features")
    p.add_argument("--num-prompts", type=int, default=d.num_prompts, help="held-out prompts")
    p.add_argument("--samples-per-prompt", type=int, default=d.samples_per_prompt, help="continuations per prompt")
    p.add_argument("--prompt-tokens", type=int, default=d.prompt_tokens, help="tokens per prompt")
    p.add_argument("--new-tokens", type=int, default=d.new_tokens, help="tokens per continuation")
    p.add_argument("--temperature", type=float, default=d.temperature, help="sampling temperature")
    p.add_argument("--top-p", type=float, default=d.top_p, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of prompts and sampling")
    p.add_argument(
        "--mauve-text",
        choices=["continuation", "prompt+continuation"],
        default=d.mauve_text,
        help="what MAUVE featurizes (default: the continuation alone)",
    )
    p.add_argument(
        "--batch-size", type=int, default=d.batch_size, help="sequences generated at once (same samples at any size)"
    )
    p.add_argument("--estimate", choices=["mean", "argmax", "sample"], help="chains: override the sampler's estimate")
    p.add_argument("--step", choices=["euler", "ancestral"], help="chains: override the sampler's step")
    p.add_argument(
        "--sample-steps", type=int, help="chains: sampler steps per token (default: one per block; >= num_blocks)"
    )
    p.add_argument(
        "--sample-top-k",
        type=int,
        help="chains of sigma-free blocks: sample among the union of the blocks' top-k prior tokens",
    )
    p.add_argument("--out", help="write the JSON here (default: stdout only)")


def execute(args, p) -> int:
    from dbscale.eval.protocol import EvalSettings

    for name in ("num_prompts", "samples_per_prompt", "prompt_tokens", "new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.num_prompts * args.samples_per_prompt < 10:
        p.error("MAUVE needs at least 10 samples: raise --num-prompts or --samples-per-prompt")

    from dbscale.commands import invocation
    from dbscale.eval.protocol import evaluate, format_table

    settings = EvalSettings(
        num_prompts=args.num_prompts,
        samples_per_prompt=args.samples_per_prompt,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        featurizer=args.featurizer,
        mauve_text=args.mauve_text,
        batch_size=args.batch_size,
    )
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        p.error("--temperature must be >= 0 and --top-p in (0, 1]")
    if args.sample_steps is not None and args.sample_steps < 1:
        p.error("--sample-steps must be >= 1 (and at least the chain's number of blocks)")
    if args.sample_top_k is not None and args.sample_top_k < 1:
        p.error("--sample-top-k must be >= 1")
    chosen = (
        ("estimate", args.estimate),
        ("step", args.step),
        ("steps", args.sample_steps),
        ("top_k", args.sample_top_k),
    )
    sampler = {k: v for k, v in chosen if v}
    from dbscale.eval.protocol import Ensemble

    ensembles = [Ensemble(tuple(x for x in spec.split(",") if x), args.ensemble_mode) for spec in args.ensemble]
    models = [(m, sampler) for m in [args.model, *args.compare, *ensembles]]
    report = evaluate(models, args.data, settings, judge=args.judge, log=lambda m: print(m, file=sys.stderr))
    report = {"command": invocation(), **report}
    text = json.dumps(report, indent=2)
    if args.out:  # written before anything else is done with it: minutes of sampling are never lost
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(format_table(report), file=sys.stderr)
    if not args.out:
        print(text)
    return 0
