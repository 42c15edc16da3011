"""Quality of DiffusionBlocks chains vs their end-to-end baselines at equal layer-updates, over seeds.

    python bench/quality.py                                     # demo recipe, 3 seeds (about 30 minutes here)
    python bench/quality.py --name long --set train.steps=1600 --set train.warmup_steps=160
    python bench/quality.py --seeds 0 --num-prompts 32         # one quick look
    python bench/quality.py --name long --set ... --sample-steps 8 --out ...   # the same chains, 2 steps per block
    python bench/quality.py --seeds 0 --ensemble                 # also B plain LMs of L/B layers, as one model

For each seed s a run is prepared from --config with train.seed=s (same data, tokenizer and calibrated
partition), every block and the baseline are trained through the real launchers for the same number of steps
(B jobs x L/B layers = L layers: equal layer-updates), and merged. Then ONE tools/evaluate.py call scores every
chain and every baseline on the same held-out prompts, seeds and references (MAUVE with MiniLM features,
generative perplexity under the first seed's baseline as judge, held-out accuracies). The judge rates its own
samples best, so the baselines of the other seeds give a second, fair ratio. With --ensemble, each seed also
trains B plain LMs of L/B layers (the depth of one block, train.seed = 100 s + j, the same steps: the chain's
layer-updates) and scores them as one model (evaluate --ensemble, product of experts): is the chain better than
B shallow LMs trained alone? Prints the mean and the
spread (half the range) over seeds and writes bench/results/quality[_<name>].json. A rerun resumes: finished
jobs are recognised by their checkpoints.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from dbscale import families

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}


def sh(*args: str) -> None:
    print("$", " ".join(args), flush=True)
    subprocess.run(args, cwd=ROOT, env=ENV, check=True)


def metric(result: dict, key: str) -> float | None:
    h = result["heldout"]
    return {
        "mauve": result["mauve"]["mauve"],
        "gen_ppl": result.get("generative_perplexity"),
        "greedy_accuracy": h["accuracy"],
        "sample_accuracy": h["sample_accuracy"],
        "heldout_ce": h["ce"] if h.get("ce") is not None else None,
        "first_step_ce": h.get("first_step_ce"),
        "distinct_4": result["distinct_4grams"],
    }[key]


KEYS = ("mauve", "gen_ppl", "greedy_accuracy", "sample_accuracy", "heldout_ce", "first_step_ce", "distinct_4")


def summarise(results: list[dict]) -> dict:
    out = {}
    for key in KEYS:
        values = [metric(r, key) for r in results if metric(r, key) is not None]
        if values:
            out[key] = {
                "mean": statistics.mean(values),
                "spread": (max(values) - min(values)) / 2,
                "values": values,
            }
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/llama_tiny.yaml")
    p.add_argument("--name", default="demo", help="names the runs (runs/quality_<name>_s<seed>) and the JSON")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="passed to prepare")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--num-prompts", type=int, default=500)
    p.add_argument("--samples-per-prompt", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=50)
    p.add_argument("--sample-steps", type=int, help="the chains' sampler steps per token (default: one per block)")
    p.add_argument(
        "--sample-top-k", type=int, help="chains of sigma-free blocks: evaluate's --sample-top-k (default: exact)"
    )
    p.add_argument("--eval-seed", type=int, default=0, help="evaluate's --seed: which held-out prompts and draws")
    p.add_argument(
        "--baselines-from",
        metavar="NAME",
        help="compare with the end-to-end models of runs/quality_<NAME>_s<seed> instead of training them again "
        "(a baseline does not depend on the block settings: same data, seed and model shape give the same job)",
    )
    p.add_argument(
        "--ensemble",
        action="store_true",
        help="also train B plain LMs of L/B layers per seed and score them as one model (product of experts)",
    )
    p.add_argument("--ensemble-mode", choices=["product", "mixture"], default="product")
    p.add_argument("--out", help="default: bench/results/quality_<name>.json")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.time()
    from dbscale.commands import invocation
    from dbscale.diffusion.partition import default_num_steps
    from dbscale.run import open_run

    runs, baseline_runs, ensembles, train_s = [], [], [], {}
    for seed in seeds:
        run = ROOT / "runs" / f"quality_{args.name}_s{seed}"
        overrides = [x for item in [*args.set, f"train.seed={seed}"] for x in ("--set", item)]
        sh(PY, "tools/prepare.py", "--config", args.config, "--run", str(run), *overrides)
        t1 = time.time()
        B = open_run(run).num_blocks
        for b in range(B):
            sh(PY, "launchers/train_block.py", "--run", str(run), "--block", str(b))
        sh(PY, "tools/merge_blocks.py", "--run", str(run))
        baseline = run if not args.baselines_from else ROOT / "runs" / f"quality_{args.baselines_from}_s{seed}"
        if not args.baselines_from:
            sh(PY, "launchers/train_e2e.py", "--run", str(run))
            sh(PY, "tools/merge_blocks.py", "--run", str(run), "--e2e")
        elif not (baseline / "e2e/merged").is_dir():
            p.error(f"--baselines-from {args.baselines_from}: {baseline / 'e2e/merged'} does not exist")
        if args.ensemble:  # B plain LMs of one block's depth, each trained alone
            cfg = open_run(run).config
            shallow = cfg.model.n_layers // B
            members = []
            for j in range(B):
                member = ROOT / "runs" / f"quality_{args.name}_s{seed}_lm{j}"
                member_sets = [
                    *args.set,
                    f"model.n_layers={shallow}",
                    "diffusion.num_blocks=1",
                    "diffusion.partition=equiprobable",  # (no block trains; nothing to calibrate)
                    f"train.seed={100 * seed + j}",
                ]
                sh(PY, "tools/prepare.py", "--config", args.config, "--run", str(member), *[
                    x for item in member_sets for x in ("--set", item)
                ])  # fmt: skip
                sh(PY, "launchers/train_e2e.py", "--run", str(member))
                sh(PY, "tools/merge_blocks.py", "--run", str(member), "--e2e")
                members.append(str(member / "e2e/merged"))
            ensembles.append(",".join(members))
        train_s[seed] = round(time.time() - t1, 1)
        runs.append(run)
        baseline_runs.append(baseline)
    out = ROOT / (args.out or f"bench/results/quality_{args.name}.json")
    models = [str(r / "merged") for r in runs] + [str(r / "e2e/merged") for r in baseline_runs]
    t1 = time.time()
    sh(
        PY,
        "tools/evaluate.py",
        "--model",
        models[0],
        *[x for m in models[1:] for x in ("--compare", m)],
        "--data",
        str(runs[0]),
        "--judge",  # seed 0's baseline, also when it was trained in another bench's run (--baselines-from)
        str(baseline_runs[0] / "e2e/merged"),
        "--num-prompts",
        str(args.num_prompts),
        "--samples-per-prompt",
        str(args.samples_per_prompt),
        "--new-tokens",
        str(args.new_tokens),
        "--seed",
        str(args.eval_seed),
        *(["--sample-steps", str(args.sample_steps)] if args.sample_steps else []),
        *(["--sample-top-k", str(args.sample_top_k)] if args.sample_top_k else []),
        *[x for e in ensembles for x in ("--ensemble", e)],
        "--ensemble-mode",
        args.ensemble_mode,
        "--out",
        str(out),
    )
    report = json.loads(out.read_text())
    n = len(runs)
    chains, baselines, ensemble_results = (
        report["results"][:n],
        report["results"][n : 2 * n],
        report["results"][2 * n :],
    )
    cfg = open_run(runs[0]).config
    summary = {"chain": summarise(chains), "e2e": summarise(baselines)}
    if ensemble_results:
        summary["ensemble"] = summarise(ensemble_results)
    c, e = summary["chain"], summary["e2e"]
    summary["ratios"] = {
        "gen_ppl_chain_over_e2e": c["gen_ppl"]["mean"] / e["gen_ppl"]["mean"],
        "mauve_chain_over_e2e": c["mauve"]["mean"] / e["mauve"]["mean"],
    }
    if n > 1:  # the judge is seed 0's baseline, which rates its own samples best: also compare with the others
        others = statistics.mean(metric(r, "gen_ppl") for r in baselines[1:])
        summary["ratios"]["gen_ppl_e2e_other_seeds"] = others
        summary["ratios"]["gen_ppl_chain_over_e2e_other_seeds"] = c["gen_ppl"]["mean"] / others
    report["bench"] = {
        "command": invocation(),
        "config": args.config,
        "overrides": args.set,
        "seeds": seeds,
        "steps_per_job": cfg.train.steps,
        "num_blocks": cfg.diffusion.num_blocks,
        "layers_per_block": families.layer_allocation(cfg),
        "baselines_from": [str(r.relative_to(ROOT)) for r in baseline_runs],
        "ensembles": [{"members": e.split(","), "mode": args.ensemble_mode} for e in ensembles],
        "block_design": {k: getattr(cfg.model, k) for k in ("block", "time_conditioning")}
        | {"sigma_draw": cfg.diffusion.sigma_draw},
        "sampler": {
            "estimate": cfg.diffusion.sample_estimate,
            "step": cfg.diffusion.sample_step,
            "steps": args.sample_steps or default_num_steps(cfg.diffusion.num_blocks, cfg.diffusion.sample_steps),
            "top_k": args.sample_top_k or cfg.diffusion.sample_top_k,
        },
        "eval_seed": args.eval_seed,
        "loss_weighting": cfg.diffusion.loss_weighting,
        "prior_loss": cfg.diffusion.prior_loss,
        "train_wall_s_per_seed": train_s,
        "evaluate_wall_s": round(time.time() - t1, 1),
        "total_wall_s": round(time.time() - t0, 1),
    }
    report["summary"] = summary
    sys.path.insert(0, str(ROOT / "bench"))
    from common import device_info, git_commit

    report["evaluate_command"] = report.get("command")  # the schema's command is the bench's own
    report.update(command=invocation(), device_info=device_info(), commit=git_commit())
    report["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out.write_text(json.dumps(report, indent=2) + "\n")
    samples = args.num_prompts * args.samples_per_prompt
    print(f"\n{args.name}: {cfg.train.steps} steps per job, seeds {seeds}, {samples} samples per model")
    columns = [("DiffusionBlocks", c), ("end-to-end", e)]
    if "ensemble" in summary:
        columns.append((f"{B} x {cfg.model.n_layers // B}-layer LMs", summary["ensemble"]))
    print(f"{'metric':18} " + " ".join(f"{name:>22}" for name, _ in columns))
    for key in KEYS:
        cells = [f"{s[key]['mean']:.3f} +- {s[key]['spread']:.3f}" if key in s else "-" for _, s in columns]
        print(f"{key:18} " + " ".join(f"{cell:>22}" for cell in cells))
    r = summary["ratios"]
    print(f"gen. ppl chain / e2e {r['gen_ppl_chain_over_e2e']:.3f}; MAUVE chain / e2e {r['mauve_chain_over_e2e']:.3f}")
    if "gen_ppl_chain_over_e2e_other_seeds" in r:
        print(f"gen. ppl chain / e2e of the seeds other than the judge's {r['gen_ppl_chain_over_e2e_other_seeds']:.3f}")
    print(f"[quality] {(time.time() - t0) / 60:.1f} min; {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
