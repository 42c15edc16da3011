"""Generation speed of the merged DiffusionBlocks chain vs the end-to-end model, both with KV caches.

    python bench/generate.py --quick
    python bench/generate.py                      # the paper's shape (12 x 768, vocab 32000)

Both models are built at the same shape with random weights (speed does not depend on the values) and
generate greedily from 64-token prompts for 256 new tokens, one sequence at a time and --batch-sizes at once
(dbscale.generate.generate_batch; tokens/s counts every sequence's tokens). The chain makes one call per block per token
(L/B layers each, one KV cache per step), so its cost per token is L layers like the baseline, plus the
per-block embedding, time conditioning and head. --block stream --sigma-free: the single-stream block without
noise conditioning runs each block's layers and head once per token (one KV cache per block); every sampler step
adds only its evidence product. Writes bench/results/generate_<shape>.json.

--profile adds, per model and batch size, where one generation call's time goes: the transformer layers, the
vocabulary-sized head (for the chain's posterior readout also its evidence product, both inside the head),
the chain's clean estimates (a softmax-weighted mean over the table: one more vocabulary-sized product) and
the rest (embeddings, the sampler, Python), timed by hooks around each part (synchronised on a GPU).

Every row also counts the FLOPs a call executes per new token (dbscale.profiling.count_flops; a call for all the
new tokens less one for the first, so the prompts' prefill is left out): the arithmetic each model asks of any
device, where tokens/s is this machine's answer.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHAPES, write_results  # noqa: E402


def main() -> int:
    import torch

    from dbscale.families import config_from_dict
    from dbscale.generate import generate_batch
    from dbscale.models.llama import DiffusionBlocksLM, LlamaLM, frozen_target_embedding
    from dbscale.profiling import count_flops

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--blocks", default="2,4", help="values of B to compare with the baseline")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch-sizes", default="1,64", help="sequences generated at once")
    p.add_argument(
        "--head",
        default="learned",
        choices=["learned", "target"],
        help="the chain's model.head ('target': logits on the frozen table, head and evidence in one product)",
    )
    p.add_argument("--target-dim", type=int, help="the chain's model.target_dim (default: d_model)")
    p.add_argument(
        "--block",
        default="two_stream",
        choices=["two_stream", "stream"],
        help="the chain's model.block ('stream': the single-stream block, docs/METHOD.md 5c)",
    )
    p.add_argument(
        "--sigma-free",
        action="store_true",
        help="with --block stream: model.time_conditioning false (one layer pass and KV cache per block and token)",
    )
    p.add_argument("--sample-steps", type=int, help="the chain's sampler steps per token (default: one per block)")
    p.add_argument("--sample-top-k", type=int, help="with --sigma-free: the chain's diffusion.sample_top_k")
    p.add_argument("--profile", action="store_true", help="also time each part of a generation call (see above)")
    p.add_argument(
        "--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="weights' dtype ('auto': bf16 on a GPU)"
    )
    p.add_argument("--out", help="file name in bench/results/ (default: generate_<shape>[_<head>_head][_e<dim>].json)")
    args = p.parse_args()
    shape = dict(SHAPES["quick" if args.quick else "full"])
    V = shape.pop("vocab")
    shape["seq_len"] = args.prompt + args.new_tokens
    device = "cuda" if torch.cuda.is_available() else "cpu"
    auto = "bf16" if device == "cuda" else "fp32"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[auto if args.dtype == "auto" else args.dtype]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, V, (max(batch_sizes), args.prompt), generator=g).tolist()

    def generate(model, batch: int, new_tokens: int = args.new_tokens) -> tuple[float, int]:
        t0 = time.perf_counter()
        gen = generate_batch(model, prompts[:batch], new_tokens, temperature=0.0, batch_size=batch)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, sum(len(x) for x in gen)

    def speed(model) -> list[dict]:
        model.eval().to(device=device, dtype=dtype)
        out = []
        for batch in batch_sizes:
            best, tokens = min(generate(model, batch) for _ in range(args.repeats))
            row = {"batch": batch, "seconds": best, "tokens_per_s": tokens / best, "new_tokens": tokens}
            # two more calls, untimed: the FLOPs per new token past the first (the prompts' prefill left out)
            first = count_flops(lambda b=batch: generate(model, b, 1))
            row["flops_per_token"] = (count_flops(lambda b=batch: generate(model, b)) - first) / (tokens - batch)
            if args.profile:
                with timed_parts(model, device) as parts:
                    row["profile_seconds"] = generate(model, batch)[0]
                row["profile"] = dict(parts)
            out.append(row)
        return out

    rows = []
    torch.manual_seed(0)
    cfg = config_from_dict({"model": shape, "diffusion": {"num_blocks": 1}, "data": {"vocab_size": V}})
    rows += [{"model": "end-to-end", "B": 1, **r} for r in speed(LlamaLM(cfg.model, V))]
    for B in [int(b) for b in args.blocks.split(",")]:
        model_keys = {**shape, "head": args.head, "target_dim": args.target_dim, "block": args.block}
        model_keys["time_conditioning"] = not args.sigma_free
        diffusion = {"num_blocks": B, "sample_steps": args.sample_steps, "sample_top_k": args.sample_top_k}
        cfg = config_from_dict({"model": model_keys, "diffusion": diffusion, "data": {"vocab_size": V}})
        model = DiffusionBlocksLM(cfg, V, frozen_target_embedding(V, cfg.model.embed_dim, 0))
        rows += [{"model": "DiffusionBlocks", "B": B, **r} for r in speed(model)]
    print(
        f"\nGeneration, shape {shape}, vocab {V}, prompt {args.prompt}, {args.new_tokens} new tokens, {device}, "
        f"{dtype}, chain head '{args.head}', target dim {args.target_dim or 'd'}, block '{args.block}'"
        + (", sigma-free" if args.sigma_free else "")
        + (f", {args.sample_steps} sampler steps" if args.sample_steps else "")
        + (f", top-{args.sample_top_k} candidates per block" if args.sample_top_k else "")
    )
    print(f"{'model':>16} {'B':>2} {'batch':>5} {'tokens/s':>9} {'vs e2e':>7} {'GFLOP/token':>12} {'vs e2e':>7}")
    base = {r["batch"]: r for r in rows if r["model"] == "end-to-end"}
    for r in rows:
        r["vs_e2e"] = r["tokens_per_s"] / base[r["batch"]]["tokens_per_s"]
        r["flops_vs_e2e"] = r["flops_per_token"] / base[r["batch"]]["flops_per_token"]
        print(
            f"{r['model']:>16} {r['B']:>2} {r['batch']:>5} {r['tokens_per_s']:9.1f} {r['vs_e2e']:7.2f} "
            f"{r['flops_per_token'] / 1e9:12.3f} {r['flops_vs_e2e']:7.2f}"
        )
    if args.profile:
        print(f"\nWhere one generation call's time goes (s; {args.prompt}-token prompts, {args.new_tokens} new tokens)")
        print(f"{'model':>16} {'B':>2} {'batch':>5} {'total':>7} " + " ".join(f"{k:>9}" for k in PARTS))
        for r in rows:
            parts = " ".join(f"{r['profile'][k]:9.2f}" for k in PARTS)
            print(f"{r['model']:>16} {r['B']:>2} {r['batch']:>5} {r['profile_seconds']:7.2f} {parts}")
    suffix = ("" if args.head == "learned" else f"_{args.head}_head") + (
        f"_e{args.target_dim}" if args.target_dim else ""
    )
    suffix += ("" if args.block == "two_stream" else f"_{args.block}") + ("_sigma_free" if args.sigma_free else "")
    suffix += f"_steps{args.sample_steps}" if args.sample_steps else ""
    suffix += f"_top{args.sample_top_k}" if args.sample_top_k else ""
    path = write_results(
        args.out or f"generate_{'quick' if args.quick else 'full'}{suffix}.json",
        {
            "shape": shape,
            "dtype": str(dtype).replace("torch.", ""),
            "chain_head": args.head,
            "chain_target_dim": args.target_dim,
            "chain_block": args.block,
            "chain_sigma_free": args.sigma_free,
            "sample_steps": args.sample_steps,
            "sample_top_k": args.sample_top_k,
            "vocab": V,
            "prompt_tokens": args.prompt,
            "rows": rows,
        },
    )
    print(f"[generate] wrote {path}")
    return 0


PARTS = ("layers", "head", "estimate", "rest")


@contextmanager
def timed_parts(model, device: str):
    """Seconds spent in each of PARTS while the block is active: forward hooks around every transformer layer
    and every vocabulary head, and a wrapper around the chain's clean estimate; 'rest' is the remainder."""
    import torch

    import dbscale.models.llama as llama
    from dbscale.models.layers import Head, TransformerLayer

    parts: dict[str, float] = defaultdict(float)
    started: dict[int, float] = {}

    def now() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def pre(module, inputs):
        started[id(module)] = now()

    def post_hook(name):
        def post(module, inputs, output):
            parts[name] += now() - started.pop(id(module))

        return post

    handles = []
    for module in model.modules():
        name = "layers" if isinstance(module, TransformerLayer) else "head" if isinstance(module, Head) else None
        if name:
            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post_hook(name))]
    estimate = llama.clean_estimate

    def timed_estimate(*a, **kw):
        t0 = now()
        out = estimate(*a, **kw)
        parts["estimate"] += now() - t0
        return out

    llama.clean_estimate = timed_estimate
    posterior = llama.StreamBlock.posterior_logits

    def timed_posterior(*a, **kw):  # the sigma-free chain's evidence product, outside the head module
        t0 = now()
        out = posterior(*a, **kw)
        parts["head"] += now() - t0
        return out

    llama.StreamBlock.posterior_logits = timed_posterior
    t0 = now()
    try:
        yield parts
    finally:
        total = now() - t0
        llama.clean_estimate = estimate
        llama.StreamBlock.posterior_logits = posterior
        for h in handles:
            h.remove()
        parts["rest"] = total - sum(parts[k] for k in PARTS if k != "rest")
        for k in PARTS:
            parts.setdefault(k, 0.0)


if __name__ == "__main__":
    sys.exit(main())
