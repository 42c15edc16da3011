"""Does the chain keep what depth buys? Answer accuracy per k on the k-hop task (configs/khop_b4.yaml).

    dbscale prepare --config configs/khop_b4.yaml --run runs/khop_b4
    dbscale launch --run runs/khop_b4 --local --e2e
    dbscale merge --run runs/khop_b4 && dbscale merge --run runs/khop_b4 --e2e
    python bench/depth.py --model "end-to-end L=8=runs/khop_b4/e2e/merged" --model "chain B=4=runs/khop_b4/merged"
    python bench/depth.py --ensemble "4 x L=2=runs/khop_l2_s0/e2e/merged,runs/khop_l2_s1/e2e/merged,..."

Each --model is LABEL=MERGED_DIR (a plain LM or a DiffusionBlocks chain); each --ensemble is LABEL=DIR,DIR,...
of plain LMs scored as a product of experts (mean log-probabilities) and as a mixture (mean probabilities). All
are read on the same held-out k-hop documents (the run's validation split, one document per window, never a
training sequence): the prediction at each answer position (after every symbol) is the model's most likely
token given the true context, a chain's through its whole sampler (temperature 0). Accuracy is reported per k,
overall and on the answers that are not null (the null answer, "no earlier occurrence", is the easy one).
Writes bench/results/depth.json (or --out), merging rows by label.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_results  # noqa: E402


def held_out(run_dir: Path, count: int) -> tuple[np.ndarray, object]:
    from dbscale.run import open_run

    run = open_run(run_dir)
    d = run.config.data
    if d.source != "khop":
        raise SystemExit(f"{run_dir}: not a k-hop run (data.source {d.source})")
    length = 2 * d.khop_symbols + 2
    docs = np.concatenate([np.asarray(a) for a in run.shards("val").arrays]).astype(np.int64).reshape(-1, length)
    return docs[:count], run


@torch.no_grad()
def answer_logprobs(model, windows: np.ndarray, batch: int = 64) -> np.ndarray:
    """(N, T, V) log-probabilities (a chain: log of its final one-hot-like estimate, used only by argmax)."""
    out = []
    chain = hasattr(model, "teacher_forced_logits")
    for i in range(0, len(windows), batch):
        w = torch.from_numpy(windows[i : i + batch])
        logits = model.teacher_forced_logits(w, seed=i, temperature=0.0) if chain else model(w[:, :-1])
        out.append(torch.log_softmax(logits.float(), -1).numpy())
    return np.concatenate(out)


def score(pred: np.ndarray, windows: np.ndarray, tok, max_k: int) -> dict:
    """Accuracy at the answer positions per k, overall and on non-null answers."""
    targets = windows[:, 1:]
    answers = np.arange(1, targets.shape[1] - 1, 2)  # t where token t + 1 is an answer (the last is the separator)
    digits = {tok.index[str(k)]: k for k in range(1, max_k + 1)}
    ks = np.array([digits[int(w[0])] for w in windows])
    null = tok.index["_"]
    correct = pred[:, answers] == targets[:, answers]
    real = targets[:, answers] != null
    rows = {}
    for k in range(1, max_k + 1):
        m = ks == k
        if m.any():
            rows[str(k)] = {
                "documents": int(m.sum()),
                "accuracy": round(float(correct[m].mean()), 4),
                "accuracy_non_null": round(float(correct[m][real[m]].mean()), 4) if real[m].any() else None,
                "null_fraction": round(float(1 - real[m].mean()), 4),
            }
    return {"per_k": rows, "accuracy": round(float(correct.mean()), 4)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=[], metavar="LABEL=DIR", help="a merged model to score")
    p.add_argument("--ensemble", action="append", default=[], metavar="LABEL=DIR,DIR", help="plain LMs as one")
    p.add_argument("--documents", type=int, default=1000, help="held-out documents to score")
    p.add_argument("--out", default="depth.json", help="result file name under bench/results/")
    args = p.parse_args()
    from dbscale.merge import load_merged
    from dbscale.models.ensemble import EnsembleLM

    torch.manual_seed(0)
    path = RESULTS / args.out
    rows = json.loads(path.read_text())["rows"] if path.is_file() else {}
    jobs = [(spec, False) for spec in args.model] + [(spec, True) for spec in args.ensemble]
    for spec, ensemble in jobs:
        label, dirs = spec.rsplit("=", 1) if "=" in spec else (spec, spec)
        dirs = dirs.split(",")
        models = [load_merged(d)[0].eval() for d in dirs]
        run_dir = next(q for q in Path(dirs[0]).resolve().parents if (q / "config.yaml").is_file())
        windows, run = held_out(run_dir, args.documents)  # R/merged or R/e2e/merged: the run R holds the data
        tok = run.tokenizer()
        results = {}
        if ensemble:  # the ensemble evaluate --ensemble reads (dbscale/models/ensemble.py)
            for kind, mode in (("product_of_experts", "product"), ("mixture", "mixture")):
                logp = answer_logprobs(EnsembleLM(models, mode), windows)
                results[kind] = score(logp.argmax(-1), windows, tok, run.config.data.khop_max_k)
        else:
            logp = answer_logprobs(models[0], windows)
            results["model"] = score(logp.argmax(-1), windows, tok, run.config.data.khop_max_k)
        rows[label] = {"models": dirs, **results}
        for kind, r in results.items():
            per_k = "  ".join(f"k={k}: {v['accuracy']:.3f}" for k, v in r["per_k"].items())
            print(f"{label:<28} {kind:<18} all {r['accuracy']:.3f}  {per_k}")
    out = write_results(args.out, {"rows": rows, "documents": args.documents})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
