"""Generation speed of the merged DiffusionBlocks chain vs the end-to-end model, both with KV caches.

    python bench/generate.py --quick
    python bench/generate.py                      # the paper's shape (12 x 768, vocab 32000)

Both models are built at the same shape with random weights (speed does not depend on the values) and
generate greedily from a 64-token prompt for 256 new tokens. The chain makes one call per block per token
(L/B layers each, one KV cache per step), so its cost per token is L layers like the baseline, plus the
per-block embedding, time conditioning and head. Writes bench/results/generate_<shape>.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHAPES, write_results  # noqa: E402


def main() -> int:
    import torch

    from dbscale.config import config_from_dict
    from dbscale.generate import generate_ids
    from dbscale.models.llama import DiffusionBlocksLM, LlamaLM, frozen_target_embedding

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--blocks", default="2,4", help="values of B to compare with the baseline")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    shape = dict(SHAPES["quick" if args.quick else "full"])
    V = shape.pop("vocab")
    shape["seq_len"] = args.prompt + args.new_tokens
    device = "cuda" if torch.cuda.is_available() else "cpu"
    prompt = torch.randint(0, V, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()

    def speed(model) -> dict:
        model.eval().to(device)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = generate_ids(model, prompt, args.new_tokens, temperature=0.0)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        best = min(times)
        return {"seconds": best, "tokens_per_s": len(out) / best, "new_tokens": len(out)}

    rows = []
    torch.manual_seed(0)
    cfg = config_from_dict({"model": shape, "diffusion": {"num_blocks": 1}, "data": {"vocab_size": V}})
    rows.append({"model": "end-to-end", "B": 1, **speed(LlamaLM(cfg.model, V))})
    for B in [int(b) for b in args.blocks.split(",")]:
        cfg = config_from_dict({"model": shape, "diffusion": {"num_blocks": B}, "data": {"vocab_size": V}})
        model = DiffusionBlocksLM(cfg, V, frozen_target_embedding(V, cfg.model.embed_dim, 0))
        rows.append({"model": "DiffusionBlocks", "B": B, **speed(model)})
    print(f"\nGeneration, shape {shape}, vocab {V}, prompt {args.prompt}, {args.new_tokens} new tokens, {device}")
    print(f"{'model':>16} {'B':>2} {'tokens/s':>9} {'vs e2e':>7}")
    for r in rows:
        r["vs_e2e"] = r["tokens_per_s"] / rows[0]["tokens_per_s"]
        print(f"{r['model']:>16} {r['B']:>2} {r['tokens_per_s']:9.1f} {r['vs_e2e']:7.2f}")
    path = write_results(
        f"generate_{'quick' if args.quick else 'full'}.json",
        {
            "shape": shape,
            "vocab": V,
            "rows": rows,
            "note": "masked-family steps/s: the family is not implemented yet (issue 3)",
        },
    )
    print(f"[generate] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
