"""Sample text from a merged model (DiffusionBlocks chain or end-to-end baseline), and evaluate it.

dbscale generate --model runs/tiny/merged --prompt "The Congress" --max-new-tokens 40
dbscale generate --model runs/tiny/e2e/merged --prompt-file prompts.txt --format jsonl
dbscale generate --model runs/tiny/merged --heldout runs/tiny     # held-out CE / accuracy

Masked family (the sampler runs from all-mask; each step is served by the block owning its t):
dbscale generate --model runs/mdm/merged --num-samples 4 --steps 128            # unconditional
dbscale generate --model runs/mdm/merged --prompt "the president said"          # prefix
dbscale generate --model runs/mdm/merged --infill "the ____ of the union"        # '_' is filled
dbscale generate --model runs/mdm/merged --bpc runs/mdm --t-samples 8            # bits per character
"""

import json
import sys
import time
from pathlib import Path

from dbscale.errors import GenerationError


def run_prompts(args, tokenizer, manifest) -> list[str]:
    """The prompts of --prompt / --prompt-file as the model's training text was written (its data.normalize and
    out-of-vocabulary rule), so 'The Congress' reaches a text8-normalised character model as 'the congress'."""
    from dbscale.data.sources import as_run_text
    from dbscale.families import frozen_config_from_dict

    data = frozen_config_from_dict(manifest["config"], where=f"{args.model}/manifest.json").data
    return [as_run_text(prompt, data, tokenizer) for prompt in read_prompts(args)]


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise GenerationError(f"--prompt-file {path}: no such file.")
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    prompts.append(json.loads(line)["prompt"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise GenerationError(f'{path}:{n}: expected a JSON object with a "prompt" field.') from None
            else:
                prompts.append(line)
    return prompts


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="merged model directory (R/merged or R/e2e/merged)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompt-file", help='prompts, one per line (.txt) or {"prompt": ...} per line (.jsonl)')
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the paper's decoding)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling and the chain's noise")
    p.add_argument(
        "--batch-size", type=int, default=64, help="prompts generated at once (the tokens do not depend on it)"
    )
    p.add_argument(
        "--estimate",
        choices=["mean", "argmax", "sample"],
        help="DiffusionBlocks chain: the clean estimate each step hands on (default: diffusion.sample_estimate)",
    )
    p.add_argument(
        "--step",
        choices=["euler", "ancestral"],
        help="DiffusionBlocks chain: the sampler step (default: diffusion.sample_step)",
    )
    p.add_argument(
        "--sample-steps",
        type=int,
        help="DiffusionBlocks chain: sampler steps per token (default: diffusion.sample_steps, one per block)",
    )
    p.add_argument(
        "--sample-top-k",
        type=int,
        help="DiffusionBlocks chain of sigma-free blocks: sample among the union of the blocks' top-k prior tokens",
    )
    p.add_argument("--format", choices=["text", "jsonl"], default="text", help="output format")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu", help="where the model runs")
    p.add_argument("--heldout", metavar="RUN", help="also report teacher-forced CE/accuracy on RUN's validation split")
    p.add_argument("--heldout-windows", type=int, default=32, help="validation windows for --heldout")
    masked = p.add_argument_group("masked family")
    masked.add_argument("--num-samples", type=int, default=1, help="samples per prompt (or unconditional)")
    masked.add_argument("--length", type=int, help="characters per sample (default: model.seq_len)")
    masked.add_argument("--steps", type=int, help="ancestral sampling steps (default: diffusion.sample_steps)")
    masked.add_argument("--infill", action="append", default=[], help="a template whose '_' characters are filled")
    masked.add_argument(
        "--cached",
        action="store_true",
        help="reuse predictions between unchanged steps (needs a model without time conditioning)",
    )
    masked.add_argument("--bpc", metavar="RUN", help="bits per character on RUN's validation split")
    masked.add_argument("--bpc-windows", type=int, default=64, help="validation windows for --bpc")
    masked.add_argument("--t-samples", type=int, default=8, help="t samples per block and window for --bpc")


def execute(args, p) -> int:
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be >= 1")
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    if not 0 < args.top_p <= 1:
        p.error("--top-p must be in (0, 1]")
    if args.temperature < 0:
        p.error("--temperature must be >= 0 (0 = greedy)")

    from tqdm import tqdm

    from dbscale import families
    from dbscale.generate import check_prompt_length, generate_texts, heldout_metrics, prompt_ids
    from dbscale.merge import load_merged

    model, tokenizer, manifest = load_merged(args.model, args.device)
    if args.estimate or args.step or args.sample_steps is not None or args.sample_top_k is not None:
        if manifest["kind"] != "blocks" or not hasattr(model, "estimate"):
            raise GenerationError(
                f"--estimate, --step, --sample-steps and --sample-top-k choose how a Gaussian chain samples; "
                f"{args.model} is not one."
            )
        if args.sample_top_k is not None:
            try:
                model.set_top_k(args.sample_top_k)
            except ValueError as e:
                raise GenerationError(f"--sample-top-k {args.sample_top_k}: {e} ({args.model}).") from None
        model.estimate, model.step = args.estimate or model.estimate, args.step or model.step
        if args.sample_steps is not None:
            try:
                model.set_sample_steps(args.sample_steps)
            except ValueError as e:
                raise GenerationError(f"--sample-steps {args.sample_steps}: {e} ({args.model}).") from None
    label = "DiffusionBlocks" if manifest["kind"] == "blocks" else "end-to-end"
    family = families.get(manifest.get("family", "llama"))
    if family.generates == "sequence":
        return masked_main(args, model, tokenizer, manifest, label)
    if args.infill or args.bpc or args.cached:
        raise GenerationError(
            f"--infill, --cached and --bpc are for a family that generates whole sequences (masked); {args.model} "
            f"is a '{family.name}' model."
        )
    prompts = run_prompts(args, tokenizer, manifest)
    if not prompts and not args.heldout:
        raise GenerationError("nothing to do: give --prompt, --prompt-file or --heldout.")
    for n, prompt in enumerate(prompts, 1):  # every prompt is checked before anything is generated
        try:
            check_prompt_length(model, len(prompt_ids(tokenizer, prompt)), args.max_new_tokens)
        except GenerationError as e:
            raise GenerationError(f"prompt {n} ({prompt[:40]!r}...): {e}") from None
    bar = tqdm(
        total=len(prompts) * args.max_new_tokens,
        desc=f"generating ({label})",
        unit="tok",
        file=sys.stderr,
        disable=None,
    )
    t0 = time.time()
    results = generate_texts(
        model,
        tokenizer,
        prompts,
        seed=args.seed,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        progress=bar,
    )
    seconds = time.time() - t0
    tokens = sum(r["new_tokens"] for r in results)
    for result in results:
        result["model"] = label
        if args.format == "jsonl":
            print(json.dumps(result), flush=True)
        else:
            bold, plain = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("", "")
            header = f"--- [{label}] {result['new_tokens']} tokens"
            bar.write(f"{header}\n{result['prompt']}{bold}{result['completion']}{plain}", file=sys.stdout)
    if prompts:
        print(
            f"[generate] {len(prompts)} prompt(s), {tokens} tokens in {seconds:.2f} s "
            f"({tokens / max(seconds, 1e-9):,.1f} tok/s, batch {min(args.batch_size, len(prompts))})",
            file=sys.stderr,
        )
    bar.close()
    if args.heldout:
        from dbscale.run import open_run

        run = open_run(args.heldout)
        if run.manifest["tokenizer_sha256"] != manifest["tokenizer_sha256"]:
            raise GenerationError(f"--heldout {args.heldout}: that run uses another tokenizer than {args.model}.")
        windows = run.shards("val").fixed_windows(args.heldout_windows, run.config.model.seq_len + 1, seed=12345)
        metrics = heldout_metrics(model, windows)
        print(json.dumps({"model": label, "heldout": str(args.heldout), **metrics}), flush=True)
        if manifest["kind"] == "blocks":
            from dbscale.generate import chain_diagnostics

            for row in chain_diagnostics(model, windows[: min(len(windows), 16)]):
                print(json.dumps({"model": label, "chain_step": row}), flush=True)
    return 0


def masked_main(args, model, tokenizer, manifest, label) -> int:
    from tqdm import tqdm

    from dbscale.eval.likelihood import masked_bpc, masked_generate

    jobs = [("prompt", q) for q in run_prompts(args, tokenizer, manifest)] + [("template", q) for q in args.infill]
    if not jobs and not args.bpc:
        jobs = [("unconditional", None)]
    steps = args.steps or model.default_steps()
    bar = tqdm(
        total=len(jobs) * steps,
        desc=f"sampling ({label}, {model.num_blocks} block(s))",
        unit="step",
        file=sys.stderr,
        disable=None,
    )
    for kind, text in jobs:
        results = masked_generate(
            model,
            tokenizer,
            num_samples=args.num_samples,
            length=args.length,
            steps=steps,
            prompt=text if kind == "prompt" else None,
            template=text if kind == "template" else None,
            seed=args.seed,
            use_cache=args.cached,
            progress=bar,
        )
        for r in results:
            r["model"] = label
            if args.format == "jsonl":
                print(json.dumps(r), flush=True)
            else:
                bar.write(
                    f"--- [{label}] {kind}, {r['steps']} steps, {r['steps_per_s']} steps/s\n{r['text']}",
                    file=sys.stdout,
                )
    bar.close()
    if args.bpc:
        from dbscale.run import open_run

        run = open_run(args.bpc)
        if run.manifest["tokenizer_sha256"] != manifest["tokenizer_sha256"]:
            raise GenerationError(f"--bpc {args.bpc}: that run uses another tokenizer than {args.model}.")
        windows = run.shards("val").fixed_windows(args.bpc_windows, run.config.model.seq_len, seed=12345)
        result = masked_bpc(model, windows, num_t=args.t_samples)
        unit = "bpc" if run.config.data.tokenizer_type == "char" else "bits_per_token"
        print(json.dumps({"model": label, "data": str(args.bpc), unit: result["bits_per_token"], **result}), flush=True)
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
