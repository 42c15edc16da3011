"""Does a denoiser block learn what a language model of its depth learns? Ablations of the block's design.

    python bench/denoiser_learning.py                          # demo recipe, block 0, 400 steps
    python bench/denoiser_learning.py --variants lm,paper,dbscale --seeds 0,1,2
    python bench/denoiser_learning.py --block 2 --variants paper,dbscale

Every job is trained in this process on the run's data with the recipe's optimizer (AdamW, warm-up + decay,
clipping, micro-batch) for the same number of steps, drawing the same windows as the block jobs do:
  lm        a plain causal LM (LlamaLM) of the block's depth: the reference
  paper     the paper's denoiser block (model.block paper: noisy input z, EDM readout, zero-initialised
            readout, EDM loss weight, no prior term)
  dbscale   dbscale's two-stream block (noisy rows read the token they follow, posterior readout, prior term)
  stream, stream_free  the single-stream block, noise-conditioned and sigma-free
  <variant>:<field>=<value>  one diffusion field changed (loss_weighting, prior_loss, sigma_draw)
A block is trained on its own widened sigma slice with the run's log-normal draw. Measured on fixed held-out
windows (--eval-windows x seq_len positions): the block fed z = sigma_max * eps, where it must predict from the
context alone (cross-entropy and accuracy, against steps), and its cross-entropy over its own slice (one fixed
sigma and noise per window). Writes bench/results/denoiser_learning[_block<b>].json after every job (a rerun
skips finished jobs) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import results_path, write_results  # noqa: E402
from dbscale import families  # noqa: E402

# variant -> the block (model fields) and the loss it trains with (diffusion fields). The design switches
# these blocks once were combinations of (noisy_input, readout, readout_init, adaln_gate_init) were retired after
# their ablations (docs/results/ar_chain.md keeps that table; it was measured at commit a98d625 or earlier).
_LOSS = {"loss_weighting": "none", "prior_loss": 1.0, "sigma_draw": "sequence"}  # dbscale's
BLOCK_VARIANTS = {
    "paper": {"block": "paper", "time_conditioning": True, **_LOSS, "loss_weighting": "edm", "prior_loss": 0.0},
    "dbscale": {"block": "two_stream", "time_conditioning": True, **_LOSS},
    "stream": {"block": "stream", "time_conditioning": True, **_LOSS},
    "stream_free": {"block": "stream", "time_conditioning": False, **_LOSS},
}
DIFFUSION_SWITCHES = ("loss_weighting", "prior_loss", "sigma_draw")


def variant_settings(name: str) -> dict | None:
    """The settings of a variant (None for the plain LM). Names: lm, one of BLOCK_VARIANTS, optionally followed
    by ':<diffusion field>=<value>' parts, e.g. 'dbscale:prior_loss=0' or 'paper:loss_weighting=none'."""
    if name == "lm":
        return None
    base, *assignments = name.split(":")
    if base not in BLOCK_VARIANTS:
        raise ValueError(f"unknown variant '{name}': lm, {', '.join(BLOCK_VARIANTS)}, with ':<field>=<value>' parts")
    settings = dict(BLOCK_VARIANTS[base])
    for part in assignments:
        key, _, value = part.partition("=")
        if key not in DIFFUSION_SWITCHES or not value:
            raise ValueError(f"variant '{name}': '{part}' is not <field>=<value> ({', '.join(DIFFUSION_SWITCHES)})")
        settings[key] = float(value) if key == "prior_loss" else value
    if settings["prior_loss"] > 0 and settings["block"] == "paper":
        raise ValueError(f"variant '{name}': prior_loss needs a block with a prior (the paper's EDM readout has none)")
    if settings["sigma_draw"] == "position" and (settings["block"] != "stream" or settings["time_conditioning"]):
        raise ValueError(f"variant '{name}': sigma_draw=position needs the sigma-free block (stream_free)")
    return settings


def build(run, settings: dict | None, block: int):
    from dataclasses import replace

    from dbscale.models.llama import LlamaLM, block_reads_table, denoiser_block

    cfg = run.config
    layers = families.layer_allocation(cfg)[block]
    if settings is None:
        return LlamaLM(replace(cfg.model, n_layers=layers), run.vocab_size)
    model_cfg = replace(cfg.model, **{k: v for k, v in settings.items() if k not in DIFFUSION_SWITCHES})
    table = run.load_target_embedding() if block_reads_table(model_cfg) else None
    return denoiser_block(model_cfg, run.vocab_size, layers, cfg.diffusion.sigma_data, table)


@torch.no_grad()
def evaluate(model, run, windows: torch.Tensor, interval, batch: int, seed: int) -> dict:
    """Context-only CE / accuracy at sigma_max and CE over the slice (a plain LM: its CE and accuracy)."""
    from dbscale.diffusion.noise import sample_truncated_lognormal
    from dbscale.models.llama import LlamaLM

    model.eval()
    d = run.config.diffusion
    E = run.load_target_embedding()
    sums = {"ce": 0.0, "correct": 0.0, "slice_ce": 0.0}
    g = torch.Generator().manual_seed(seed)
    for i in range(0, len(windows), batch):
        w = windows[i : i + batch]
        context, targets = w[:, :-1], w[:, 1:]
        if not isinstance(model, LlamaLM):
            n = len(w)
            noise = torch.randn(n, targets.shape[1], E.shape[1], generator=g)
            _, logits = model(context, d.sigma_max * noise, torch.full((n,), d.sigma_max))
            sigma = sample_truncated_lognormal(n, *interval, d.P_mean, d.P_std, generator=g).float()
            _, slice_ce = model(context, E[targets] + sigma.view(-1, 1, 1) * noise, sigma, targets=targets)
            sums["slice_ce"] += slice_ce.sum().item()
        else:
            logits = model(context)
        sums["ce"] += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        sums["correct"] += (logits.argmax(-1) == targets).sum().item()
    model.train()
    n = windows[:, 1:].numel()
    out = {"ce": sums["ce"] / n, "accuracy": sums["correct"] / n}
    if not isinstance(model, LlamaLM):
        out["slice_ce"] = sums["slice_ce"] / n
    return out


def train_job(run, name: str, block: int, steps: int, seed: int, eval_every: int, windows, log=print) -> dict:
    """Train one variant; returns its evaluations against steps and the final one."""
    from dbscale.diffusion.noise import sample_truncated_lognormal
    from dbscale.models.llama import denoiser_loss, lm_loss
    from dbscale.train.deepspeed_config import lr_lambda
    from dbscale.train.trainer import _seed

    cfg, t = run.config, run.config.train
    settings = variant_settings(name)
    torch.manual_seed(_seed(seed, block + 1, 17))
    model = build(run, settings, block)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.betas), eps=1e-8, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t))
    interval = tuple(run.manifest["partition"]["train_intervals"][block])
    E = run.load_target_embedding()
    train = run.shards("train")
    d = cfg.diffusion
    length = cfg.model.seq_len + 1
    curve, losses, t0 = [], [], time.time()
    for step in range(steps):
        rng = np.random.default_rng(_seed(seed, step, 0, 0, 1))  # the block jobs' data stream
        window = torch.from_numpy(train.random_windows(rng, t.micro_batch, length))
        if settings is None:
            loss = lm_loss(model, window)
        else:
            g = torch.Generator().manual_seed(_seed(seed, block + 1, step, 0, 0, 2))
            draws = len(window) * ((length - 1) if settings["sigma_draw"] == "position" else 1)
            sigma = sample_truncated_lognormal(draws, *interval, d.P_mean, d.P_std, generator=g).float()
            sigma = sigma.view(len(window), -1).squeeze(1)  # (B,) or (B, T)
            noise = torch.randn(len(window), length - 1, E.shape[1], generator=g)
            weighting, prior = settings["loss_weighting"], settings["prior_loss"]
            loss, _ = denoiser_loss(model, window, E, sigma, noise, weighting, d.sigma_data, 0, prior)
        losses.append(loss.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        sched.step()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            row = {"step": step + 1, **evaluate(model, run, windows, interval, t.micro_batch, seed=99)}
            curve.append(row)
            rate = (step + 1) * t.micro_batch * (length - 1) / (time.time() - t0)
            slice_part = f", own slice CE {row['slice_ce']:.3f}" if "slice_ce" in row else ""
            log(
                f"  [{name} seed {seed}] step {step + 1}: context-only CE {row['ce']:.3f}, acc {row['accuracy']:.3f}"
                f"{slice_part} ({rate:,.0f} tok/s)"
            )
    return {
        "variant": name,
        "seed": seed,
        "settings": settings,
        "parameters": sum(p.numel() for p in model.parameters()),
        "curve": curve,
        "final": {**curve[-1], "loss_noise": loss_noise(losses)},
        "losses": [round(x, 5) for x in losses],
        "seconds": round(time.time() - t0, 1),
    }


def loss_noise(losses: list[float]) -> float:
    """The step-to-step noise of the training loss over the second half of training: the std of consecutive
    differences / sqrt(2) (the std of one step's loss about a slowly moving mean, trend removed)."""
    tail = np.asarray(losses[len(losses) // 2 :])
    return float(np.diff(tail).std() / np.sqrt(2)) if len(tail) > 2 else float("nan")


def summarise(jobs: list[dict]) -> list[dict]:
    by_variant: dict[str, list[dict]] = {}
    for job in jobs:
        by_variant.setdefault(job["variant"], []).append(job)
    rows = []
    for name, runs in by_variant.items():
        row = {"variant": name, "seeds": len(runs), "settings": runs[0]["settings"]}
        for key in ("ce", "accuracy", "slice_ce", "loss_noise"):
            values = [r["final"][key] for r in runs if key in r["final"]]
            if values:
                row[key] = statistics.mean(values)
                row[f"{key}_spread"] = (max(values) - min(values)) / 2 if len(values) > 1 else 0.0
        rows.append(row)
    lm = next((r for r in rows if r["variant"] == "lm"), None)
    for row in rows:
        if lm is not None:
            row["ce_vs_lm"] = row["ce"] / lm["ce"] - 1
    return rows


def print_table(summary: list[dict], block: int, steps: int) -> None:
    print(f"\nblock {block}, {steps} steps; context-only = fed z = sigma_max * eps (a plain LM: its own CE)")
    head = (
        f"{'variant':18} {'seeds':>5} {'context-only CE':>17} {'vs LM':>7} {'accuracy':>9} {'own-slice CE':>13} "
        f"{'loss noise':>10}"
    )
    print(head)
    print("-" * len(head))
    for r in summary:
        spread = f" +-{r['ce_spread']:.3f}" if r["seeds"] > 1 else ""
        vs = f"{100 * r['ce_vs_lm']:+.1f}%" if "ce_vs_lm" in r else "-"
        slice_ce = f"{r['slice_ce']:.3f}" if "slice_ce" in r else "-"
        noise = f"{r['loss_noise']:.4f}" if "loss_noise" in r else "-"
        print(
            f"{r['variant']:18} {r['seeds']:>5} {r['ce']:>9.3f}{spread:>8} {vs:>7} {r['accuracy']:>9.3f} "
            f"{slice_ce:>13} {noise:>10}"
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/llama_tiny.yaml")
    p.add_argument("--run", default="runs/bench_learning", help="prepared here from --config when missing")
    p.add_argument("--block", type=int, default=0)
    p.add_argument(
        "--variants",
        default="lm,paper,paper:loss_weighting=none,dbscale,dbscale:prior_loss=0,stream,stream_free",
    )
    p.add_argument("--seeds", default="0")
    p.add_argument("--steps", type=int, default=None, help="default: the recipe's train.steps")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from dbscale.create_run import calibrate_if_pending, prepare_run
    from dbscale.families import load_config
    from dbscale.run import open_run

    run_dir = Path(args.run)
    if not (run_dir / "manifest.json").is_file():
        prepare_run(load_config(args.config), run_dir)
    run = calibrate_if_pending(open_run(run_dir))
    steps = args.steps or run.config.train.steps
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        variant_settings(v)  # unknown names fail before any training
    seeds = [int(s) for s in args.seeds.split(",")]
    name = Path(args.out or f"denoiser_learning{'' if args.block == 0 else f'_block{args.block}'}.json").name
    out = results_path(name)  # bench/results/<name> (--out: a file name there; a path keeps its name)
    done = json.loads(out.read_text()) if out.is_file() else {}
    key = {"run_config": run.config.to_dict(), "block": args.block, "steps": steps, "eval_windows": args.eval_windows}
    jobs = done.get("jobs", []) if all(done.get(k) == v for k, v in key.items()) else []
    length = run.config.model.seq_len + 1
    windows = torch.from_numpy(run.shards("val").fixed_windows(args.eval_windows, length, seed=4242))
    print(
        f"block {args.block} of {run.root}: {families.layer_allocation(run.config)[args.block]} layer(s), sigma slice "
        f"{run.manifest['partition']['train_intervals'][args.block]}, {steps} steps, {windows[:, 1:].numel()} "
        "held-out positions"
    )
    for seed in seeds:
        for name in variants:
            if any(j["variant"] == name and j["seed"] == seed for j in jobs):
                continue
            jobs.append(train_job(run, name, args.block, steps, seed, args.eval_every, windows))
            write_results(out.name, {**key, "jobs": jobs, "summary": summarise(jobs)})  # command, device, commit
    summary = summarise([j for j in jobs if j["variant"] in variants and j["seed"] in seeds])
    print_table(summary, args.block, steps)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
