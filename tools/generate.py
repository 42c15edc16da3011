"""Sample text from a merged model (DiffusionBlocks chain or end-to-end baseline), and evaluate it.

python tools/generate.py --model runs/tiny/merged --prompt "The Congress" --max-new-tokens 40
python tools/generate.py --model runs/tiny/e2e/merged --prompt-file prompts.txt --format jsonl
python tools/generate.py --model runs/tiny/merged --heldout runs/tiny     # held-out CE / accuracy
"""

import argparse
import json
import sys
from pathlib import Path

from dbscale.errors import GenerationError, cli_main


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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="merged model directory (R/merged or R/e2e/merged)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompt-file", help='prompts, one per line (.txt) or {"prompt": ...} per line (.jsonl)')
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the paper's decoding)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=["text", "jsonl"], default="text")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--heldout", metavar="RUN", help="also report teacher-forced CE/accuracy on RUN's validation split")
    p.add_argument("--heldout-windows", type=int, default=32)
    args = p.parse_args()
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be >= 1")
    if not 0 < args.top_p <= 1:
        p.error("--top-p must be in (0, 1]")

    from tqdm import tqdm

    from dbscale.generate import heldout_metrics, timed_generate
    from dbscale.merge import load_merged

    model, tokenizer, manifest = load_merged(args.model, args.device)
    label = "DiffusionBlocks" if manifest["kind"] == "blocks" else "end-to-end"
    prompts = read_prompts(args)
    if not prompts and not args.heldout:
        raise GenerationError("nothing to do: give --prompt, --prompt-file or --heldout.")
    bar = tqdm(total=len(prompts) * args.max_new_tokens, desc=f"generating ({label})", unit="tok", file=sys.stderr)
    for prompt in prompts:
        result = timed_generate(
            model,
            tokenizer,
            prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            progress=bar,
        )
        result["model"] = label
        if args.format == "jsonl":
            print(json.dumps(result), flush=True)
        else:
            bold, plain = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("", "")
            header = f"--- [{label}] {result['new_tokens']} tokens, {result['tokens_per_s']} tok/s"
            bar.write(f"{header}\n{result['prompt']}{bold}{result['completion']}{plain}", file=sys.stdout)
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


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    cli_main(main)
