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
from common import RESULTS, git_commit, write_results  # noqa: E402


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


@torch.no_grad()
def block_prior_logprobs(chain, windows: np.ndarray, batch: int = 100) -> list[np.ndarray]:
    """Each sigma-free block's prior log-probabilities (N, T, V) given the true context: the block read as an LM."""
    out = [[] for _ in chain.blocks]
    for i in range(0, len(windows), batch):
        w = torch.from_numpy(windows[i : i + batch])
        for b, prior in enumerate(chain.priors([w[:, :-1]] * len(chain.blocks))):
            out[b].append(torch.log_softmax(prior.float(), -1).numpy())
    return [np.concatenate(x) for x in out]


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


def job_costs(run, chain: bool) -> list[dict]:
    """What each training job of the model cost, from its metrics.jsonl: median tokens/s of its logged windows
    and its process's peak memory (RSS on the CPU, CUDA peak on a GPU) as the trainer measured it."""
    from dbscale.train.metrics import read_metrics

    jobs = list(range(run.num_blocks)) if chain else [None]
    out = []
    for job in jobs:
        train = [e for e in read_metrics(run.job_dir(job) / "metrics.jsonl") if e["event"] == "train"]
        if train:
            out.append({
                "job": "e2e" if job is None else job,
                "tokens_per_s": round(float(np.median([e["tokens_per_s"] for e in train])), 1),
                "peak_mem_bytes": max(e["peak_mem_bytes"] for e in train),
            })  # fmt: skip
    return out


TABLE_BEGIN, TABLE_END = "<!-- depth-table: generated by python bench/depth.py --render -->", "<!-- end depth-table -->"
DOC = Path(__file__).resolve().parents[1] / "docs/results/depth.md"
FIGURE = Path(__file__).resolve().parents[1] / "docs/results/depth.png"


def scored(rows: dict) -> list[tuple[str, dict]]:
    """(label, score) per row and way of reading it, in the file's order."""
    out = []
    for label, row in rows.items():
        for kind, result in row.items():
            if kind in ("models", "scored_by", "jobs", "diagnostics"):
                continue
            out.append((label if kind == "model" else f"{label}, {kind.replace('_', ' ')}", result))
    return out


def markdown_table(results: dict) -> str:
    """The depth table of docs/results/depth.md: answer accuracy per k (and on non-null answers) per model."""
    ks = sorted({k for _, r in scored(results["rows"]) for k in r["per_k"]}, key=int)
    lines = [
        "| model | " + " | ".join(f"k={k}" for k in ks) + " | all |",
        "|---|" + "---|" * (len(ks) + 1),
    ]
    for label, r in scored(results["rows"]):
        cells = [f"{r['per_k'][k]['accuracy']:.3f}" if k in r["per_k"] else "-" for k in ks]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {r['accuracy']:.3f} |")
    for label, r in scored(results["rows"]):
        cells = [r["per_k"].get(k, {}).get("accuracy_non_null") for k in ks]
        cells = ["-" if c is None else f"{c:.3f}" for c in cells]
        lines.append(f"| {label}, non-null answers | " + " | ".join(cells) + " | |")
    diagnostics = [(label, row["diagnostics"]) for label, row in results["rows"].items() if "diagnostics" in row]
    if diagnostics:
        lines += ["", "Where a chain's answer comes from: each block's prior read alone as an LM (true context), and "
                  "their product:", "", lines[0], lines[1]]  # fmt: skip
        for label, parts in diagnostics:
            for part, r in parts.items():
                cells = [f"{r['per_k'][k]['accuracy']:.3f}" if k in r["per_k"] else "-" for k in ks]
                lines.append(f"| {label}: {part} | " + " | ".join(cells) + f" | {r['accuracy']:.3f} |")
    return "\n".join(lines)


def render(results: dict) -> None:
    """Write the table into docs/results/depth.md (between its markers) and the figure docs/results/depth.png."""
    from dbscale.plotting import COLORS, pyplot

    text = DOC.read_text()
    head, rest = text.split(TABLE_BEGIN, 1)
    _, tail = rest.split(TABLE_END, 1)
    DOC.write_text(f"{head}{TABLE_BEGIN}\n{markdown_table(results)}\n{TABLE_END}{tail}")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for i, (label, r) in enumerate(scored(results["rows"])):
        ks = sorted(r["per_k"], key=int)
        ax.plot([int(k) for k in ks], [r["per_k"][k]["accuracy"] for k in ks], "o-", color=COLORS[i % len(COLORS)],
                label=label, lw=1.5, ms=4)  # fmt: skip
    ax.axhline(0.9, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("k (hops)")
    ax.set_ylabel("answer accuracy (held-out)")
    ax.set_ylim(0, 1.02)
    ax.set_title("k-hop induction heads: what depth buys (configs/khop_b4.yaml)")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(FIGURE, dpi=120)
    plt.close(fig)


def run_of(merged: str) -> Path:
    """The run directory R of R/merged or R/e2e/merged (it holds the data and the jobs' metrics)."""
    return next(q for q in Path(merged).resolve().parents if (q / "config.yaml").is_file())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=[], metavar="LABEL=DIR", help="a merged model to score")
    p.add_argument("--ensemble", action="append", default=[], metavar="LABEL=DIR,DIR", help="plain LMs as one")
    p.add_argument("--documents", type=int, default=1000, help="held-out documents to score")
    p.add_argument("--out", default="depth.json", help="result file name under bench/results/")
    p.add_argument("--render", action="store_true", help="only write the doc's table and figure from the JSON")
    args = p.parse_args()
    if args.render:
        render(json.loads((RESULTS / args.out).read_text()))
        print(f"wrote {DOC} (table) and {FIGURE}")
        return 0
    from dbscale.merge import load_merged
    from dbscale.models.ensemble import EnsembleLM
    from dbscale.run import open_run

    torch.manual_seed(0)
    path = RESULTS / args.out
    rows = json.loads(path.read_text())["rows"] if path.is_file() else {}
    jobs = [(spec, False) for spec in args.model] + [(spec, True) for spec in args.ensemble]
    for spec, ensemble in jobs:
        label, dirs = spec.rsplit("=", 1) if "=" in spec else (spec, spec)
        dirs = dirs.split(",")
        models = [load_merged(d)[0].eval() for d in dirs]
        run_dir = run_of(dirs[0])
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
            if getattr(models[0], "sigma_free", False):  # where the chain's answer comes from: its blocks' priors
                priors = block_prior_logprobs(models[0], windows)
                diagnostics = {
                    f"block {b} prior": score(lp.argmax(-1), windows, tok, run.config.data.khop_max_k)
                    for b, lp in enumerate(priors)
                }
                product = np.mean(priors, axis=0)
                diagnostics["product of the block priors"] = score(
                    product.argmax(-1), windows, tok, run.config.data.khop_max_k
                )
                results["diagnostics"] = diagnostics
        from dbscale.commands import invocation

        # rows of several invocations share the file: each keeps the command (and commit) that scored it
        rows[label] = {"models": dirs, **results, "scored_by": {"command": invocation(), "commit": git_commit()}}
        chain = hasattr(models[0], "teacher_forced_logits")
        rows[label]["jobs"] = [job_costs(open_run(run_of(d)), chain) for d in dirs]
        for kind, r in [*results.items(), *results.get("diagnostics", {}).items()]:
            if kind == "diagnostics":
                continue
            per_k = "  ".join(f"k={k}: {v['accuracy']:.3f}" for k, v in r["per_k"].items())
            print(f"{label:<28} {kind:<18} all {r['accuracy']:.3f}  {per_k}")
    out = write_results(args.out, {"rows": rows, "documents": args.documents})
    print(f"wrote {out}; python bench/depth.py --render updates {DOC.name} and {FIGURE.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
