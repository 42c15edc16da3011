"""What one more row costs in the products of generation: the time of x @ W^T for x of M rows.

    python bench/matmul_rows.py                   # the paper's shape: d=768, its MLP width, vocabulary 32000

At batch 1 the end-to-end model runs one row (the new token) through each product; a DiffusionBlocks block runs
two (the new clean token, for its KV cache, and the noisy one). On a GPU a product of one or two rows is bound by
reading the weight, so the second row is nearly free; this bench measures what it costs on the machine it runs
on, per weight shape, as F.linear (what the models call) and as W @ x^T (the same product, which the BLAS library
may route to a different kernel). Best of --repeats timings of --calls calls each.
Writes bench/results/matmul_rows.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHAPES, write_results  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,2,4,8,64", help="values of M")
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    import torch
    import torch.nn.functional as F

    from dbscale.config import ModelConfig

    shape = SHAPES["full"]
    d = shape["d_model"]
    ffn = ModelConfig(d_model=d, n_heads=shape["n_heads"], n_layers=shape["n_layers"]).ffn_dim
    weights = {"attention d x d": (d, d), "MLP in ffn x d": (ffn, d), "MLP out d x ffn": (d, ffn)}
    weights["head V x d"] = (shape["vocab"], d)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # what generation runs in there
    rows = [int(m) for m in args.rows.split(",")]
    g = torch.Generator().manual_seed(0)

    def best_us(fn) -> float:
        fn()
        times = []
        for _ in range(args.repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.calls):
                fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) / args.calls)
        return min(times) * 1e6

    results = []
    print(f"Time of one product (microseconds, {device}, {dtype}); 'x M=1' is the ratio to one row")
    print(f"{'weight':>18} {'rows':>5} {'F.linear':>10} {'x M=1':>6} {'W @ x^T':>10} {'x M=1':>6}")
    with torch.no_grad():
        for name, (out_dim, in_dim) in weights.items():
            W = torch.randn(out_dim, in_dim, generator=g).to(device, dtype)
            one = {}
            for m in rows:
                x = torch.randn(m, in_dim, generator=g).to(device, dtype)
                linear = best_us(lambda x=x, W=W: F.linear(x, W))
                transposed = best_us(lambda x=x, W=W: W @ x.T)
                one.setdefault("linear", linear)
                one.setdefault("transposed", transposed)
                row = {"weight": name, "shape": [out_dim, in_dim], "rows": m, "linear_us": linear}
                row.update(transposed_us=transposed, linear_vs_one_row=linear / one["linear"])
                row["transposed_vs_one_row"] = transposed / one["transposed"]
                results.append(row)
                print(
                    f"{name:>18} {m:>5} {linear:10.0f} {row['linear_vs_one_row']:6.2f} "
                    f"{transposed:10.0f} {row['transposed_vs_one_row']:6.2f}"
                )
    path = write_results("matmul_rows.json", {"device": device, "dtype": str(dtype), "rows": results})
    print(f"[matmul_rows] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
