"""Huginn family: the truncated-BPTT baseline vs the DiffusionBlocks core, measured side by side.

    python bench/huginn.py --quick                 # memory + speed tables at a small shape (a few minutes here)
    python bench/huginn.py                         # the paper's shape (d=512, 8 heads, 2/4/2 layers, seq 256)
    python bench/huginn.py --quality               # equal training compute on the bundled corpus, then MAUVE

Memory/speed (one fresh process per job, as bench/memory.py): parameter, gradient and AdamW bytes, saved
activation bytes of one training step (autograd saved-tensor hooks), peak RSS rise on CPU or CUDA peak on a GPU,
step time and training tokens/s; the baseline at r = 32 iterations with BPTT over the last k = 1, 4, 8, 16, the
diffusion core at one pass (its training has no K). Generation tokens/s (KV caches, prompt 64, 64 new tokens):
the baseline at r = 8, 16, 32 iterations per token, the core at K = 8, 16, 32 Euler steps.

Quality (--quality): trains both on configs/huginn_tiny.yaml at equal estimated training compute, counted in
layer-token evaluations (forward 1, backward 2):
  baseline  T (P + E[r] C + D) + 2 T (P + k C + D)      (the early r - k iterations run forward only)
  core      3 T P + 3 (2T) (C + D)                      (the prelude reads T clean tokens; core and coda 2T)
with P, C, D the prelude, core and coda layers and E[r] = mean_recurrence + 1; then MAUVE (MiniLM features),
held-out CE and accuracy of both on the same prompts (tools/evaluate.py's protocol), for each of --seeds (the
cores and baselines of every seed in one evaluate call; the mean and half the range are printed).
Writes bench/results/huginn_{quick,full,quality}.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, mib, parse_or_measure, peak_rss_bytes, rss_bytes, run_worker, write_results  # noqa: E402

SHAPES = {
    "full": {"d_model": 512, "n_heads": 8, "seq_len": 256, "vocab": 32000},
    "quick": {"d_model": 128, "n_heads": 4, "seq_len": 128, "vocab": 2048},
}
BASELINE_R = 32
KS = (1, 4, 8, 16)
GEN_STEPS = (8, 16, 32)


# The diffusion core's layouts (model.block, model.time_conditioning): the job names of the tables.
CORES = {
    "diffusion core": {"block": "two_stream", "time_conditioning": True},
    "stream core": {"block": "stream", "time_conditioning": True},
    "sigma-free stream core": {"block": "stream", "time_conditioning": False},
}


def model_cfg(shape: dict, job: str = "baseline", **extra):
    from dbscale.config import ModelConfig
    from dbscale.models.huginn import HuginnConfig

    return ModelConfig(
        family="huginn",
        n_layers=8,
        d_model=shape["d_model"],
        n_heads=shape["n_heads"],
        seq_len=shape["seq_len"],
        family_config=HuginnConfig(mean_recurrence=BASELINE_R, **extra),
        **CORES.get(job, {}),
    )


def measure_training(spec: dict) -> dict:
    import torch

    from dbscale.models.huginn import HuginnDenoiser, HuginnLM
    from dbscale.models.llama import denoiser_loss, frozen_target_embedding, lm_loss
    from dbscale.profiling import saved_activation_bytes, state_bytes

    shape = SHAPES[spec["shape"]]
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    V, T, mb = shape["vocab"], shape["seq_len"], spec["micro_batch"]
    cfg = model_cfg(shape, spec["job"])
    torch.manual_seed(0)
    warm = HuginnLM(model_cfg(SHAPES["quick"]), 64).to(device)  # load kernels before measuring
    lm_loss(warm, torch.randint(0, 64, (1, 9), device=device)).backward()
    del warm
    rss0 = rss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    g = torch.Generator().manual_seed(1)
    if spec["job"] == "baseline":
        model = HuginnLM(cfg, V).to(device, dtype)
        model.recurrence = (spec["r"], spec["k"], 0)
        table = None
    else:
        table = frozen_target_embedding(V, cfg.embed_dim, 0).to(device, dtype)
        model = HuginnDenoiser(cfg, V, 0.5, table).to(device, dtype)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def loss_fn(window):
        if table is None:
            return lm_loss(model, window)
        sigma = torch.exp(torch.randn(mb, generator=g) * 1.2 - 1.2).to(device)
        noise = torch.randn(mb, T, cfg.embed_dim, generator=g).to(device, dtype)
        prior = spec.get("prior_loss", 0.0)  # the files before the stream cores: 0
        stream = cfg.block == "stream"
        return denoiser_loss(model, window, table, sigma, noise, "edm", 0.5, 0, prior, None, stream)[0]

    times, saved, states = [], None, None
    for step in range(spec["steps"]):
        window = torch.randint(0, V, (mb, T + 1), generator=g).to(device)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        holder = {}
        if step == 1:
            held = [*model.parameters(), *model.buffers()]
            saved = saved_activation_bytes(lambda h=holder, w=window: h.update(loss=loss_fn(w)), held)
        else:
            holder["loss"] = loss_fn(window)
        holder["loss"].backward()
        if step == 1:
            states = state_bytes(model, opt)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[1:])
    out = {
        **spec,
        "dtype": str(dtype).replace("torch.", ""),
        "parameter_bytes": states["parameters"],
        "gradient_bytes": states["gradients"],
        "optimizer_bytes": states["optimizer"],
        "saved_activation_bytes": saved["bytes"],
        "step_s": step_s,
        "tokens_per_s": mb * T / step_s,
    }
    if cuda:
        out["peak_bytes"], out["peak_kind"] = torch.cuda.max_memory_allocated(), "cuda_max_memory_allocated"
    else:
        out["peak_bytes"], out["peak_kind"] = peak_rss_bytes() - rss0, "peak RSS rise"
    return out


def measure_generation(spec: dict) -> dict:
    import torch

    from dbscale.config import Config, DiffusionConfig
    from dbscale.generate import generate_ids
    from dbscale.models.huginn import HuginnDiffusionLM, HuginnLM
    from dbscale.models.llama import frozen_target_embedding

    shape = SHAPES[spec["shape"]]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n = spec["steps_per_token"]
    torch.manual_seed(0)
    if spec["job"] == "baseline":
        model = HuginnLM(model_cfg(shape, eval_recurrence=n), shape["vocab"])
    else:
        d = DiffusionConfig(num_blocks=1, sample_steps=n, gamma=0.0)
        cfg = Config(model=model_cfg(shape, spec["job"]), diffusion=d)
        model = HuginnDiffusionLM(cfg, shape["vocab"], frozen_target_embedding(shape["vocab"], shape["d_model"], 0))
    for p in model.parameters():  # random weights everywhere (a zero-initialised head would make argmax trivial)
        torch.nn.init.normal_(p, std=0.02)
    model.eval().to(device)
    prompt = torch.randint(0, shape["vocab"], (spec["prompt"],)).tolist()
    generate_ids(model, prompt[:8], 4)  # warm-up
    t0 = time.perf_counter()
    out = generate_ids(model, prompt, spec["new_tokens"], temperature=1.0, seed=0)
    dt = time.perf_counter() - t0
    return {**spec, "new_tokens": len(out), "time_s": dt, "tokens_per_s": len(out) / dt}


def layer_token_cost(m, T: int) -> dict:
    """Estimated training compute per sequence and step, in layer-token evaluations (forward 1, backward 2);
    a single-stream core (model.block stream) runs core and coda over T rows, the two-stream one over 2T."""
    h = m.family_config  # the Huginn section
    P, C, D = h.prelude_layers, h.core_layers, h.coda_layers
    mean_r, k = h.mean_recurrence + 1, h.bptt_steps
    rows = T if m.block == "stream" else 2 * T
    return {
        "baseline": T * (P + mean_r * C + D) + 2 * T * (P + min(k, mean_r) * C + D),
        "core": 3 * T * P + 3 * rows * (C + D),
    }


def quality(args) -> int:
    from dbscale.eval.protocol import EvalSettings, evaluate, format_table
    from dbscale.families import load_config

    env = {**os.environ, "PYTHONWARNINGS": "ignore", "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}

    def sh(*a):
        print("$", " ".join(a), flush=True)
        t0 = time.time()
        subprocess.run(a, cwd=ROOT, env=env, check=True)
        return round(time.time() - t0, 1)

    cores = args.cores.split(",")
    if len(cores) != 1 or cores[0] not in CORES:
        raise SystemExit(f"--quality takes one of --cores {list(CORES)}, got {args.cores!r}")
    core = CORES[cores[0]]
    core_sets = [x for k, v in core.items() for x in ("--set", f"model.{k}={str(v).lower()}")]
    cfg = load_config(ROOT / args.config, [item for item in core_sets if item != "--set"])
    cost = layer_token_cost(cfg.model, cfg.model.seq_len)
    base_steps = args.baseline_steps
    core_steps = round(base_steps * cost["baseline"] / cost["core"])
    seeds = [int(x) for x in args.seeds.split(",")]
    runs = [ROOT / (args.run if seed == 0 else f"{args.run}_s{seed}") for seed in seeds]
    wall = {}

    def steps_args(n):
        return ["--set", f"train.steps={n}", "--set", f"train.val_every={n}", "--set", f"train.save_every={n}"]

    for seed, run_dir in zip(seeds, runs, strict=True):
        sh(
            sys.executable,
            "tools/prepare.py",
            "--config",
            args.config,
            "--run",
            str(run_dir),
            "--set",
            f"train.seed={seed}",
            *core_sets,
        )
        wall[seed] = {
            "baseline": sh(sys.executable, "launchers/train_e2e.py", "--run", str(run_dir), *steps_args(base_steps)),
            "core": sh(
                sys.executable,
                "launchers/train_block.py",
                "--run",
                str(run_dir),
                "--block",
                "0",
                *steps_args(core_steps),
            ),
        }
        sh(sys.executable, "tools/merge_blocks.py", "--run", str(run_dir), "--allow-unfinished")
        sh(sys.executable, "tools/merge_blocks.py", "--run", str(run_dir), "--e2e", "--allow-unfinished")
    # one call: every core and every baseline on the same prompts, seeds and references; judge: seed 0's baseline
    settings = EvalSettings(num_prompts=args.num_prompts)
    models = [str(r / "merged") for r in runs] + [str(r / "e2e/merged") for r in runs]
    report = evaluate(models, runs[0], settings)
    print(format_table(report))
    n = len(runs)
    summary = {}
    for name, results in (("core", report["results"][:n]), ("baseline", report["results"][n:])):
        values = {
            "mauve": [r["mauve"]["mauve"] for r in results],
            "gen_ppl": [r["generative_perplexity"] for r in results],
            "greedy_accuracy": [r["heldout"]["accuracy"] for r in results],
            "sample_accuracy": [r["heldout"]["sample_accuracy"] for r in results],
        }
        summary[name] = {
            k: {"mean": statistics.mean(v), "spread": (max(v) - min(v)) / 2, "values": v} for k, v in values.items()
        }
    print(f"\nHuginn, seeds {seeds}, {args.num_prompts * settings.samples_per_prompt} samples per model")
    for k in summary["core"]:
        c, b = summary["core"][k], summary["baseline"][k]
        print(f"{k:16} core {c['mean']:.3f} +- {c['spread']:.3f}   baseline {b['mean']:.3f} +- {b['spread']:.3f}")
    payload = {
        "config": args.config,
        "seeds": seeds,
        "baseline_steps": base_steps,
        "core_steps": core_steps,
        "layer_token_cost_per_sequence_step": cost,
        "total_compute": {"baseline": cost["baseline"] * base_steps, "core": cost["core"] * core_steps},
        "train_wall_s": wall,
        "mauve_note": "MAUVE (MiniLM features): not comparable to gpt2-large MAUVE",
        "summary": summary,
        "evaluation": report,
    }
    payload["core"] = {"name": cores[0], **core}
    slug = "" if cores[0] == "diffusion core" else "_" + cores[0].replace(" ", "_").replace("-", "_")
    path = write_results(f"huginn_quality{slug}.json", payload)
    print(f"[huginn] wrote {path}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the small shape (minutes on a CPU)")
    p.add_argument(
        "--cores",
        default="diffusion core",
        help=f"comma-separated diffusion cores to measure beside the baseline, of {list(CORES)}",
    )
    p.add_argument("--prior-loss", type=float, default=0.0, help="the cores' diffusion.prior_loss in the timing jobs")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="training steps per measurement (>= 2)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--quality", action="store_true", help="equal-compute training + MAUVE instead of memory/speed")
    p.add_argument("--config", default="configs/huginn_tiny.yaml")
    p.add_argument("--run", default="runs/bench_huginn")
    p.add_argument("--baseline-steps", type=int, default=300)
    p.add_argument("--num-prompts", type=int, default=500)
    p.add_argument("--seeds", default="0,1,2", help="--quality: training seeds (seed 0 in --run, seed s in --run_s<s>)")
    args = parse_or_measure(
        p, lambda spec: (measure_generation if spec.get("kind") == "generate" else measure_training)(spec)
    )
    if args is None:
        return 0
    if args.quality:
        return quality(args)
    if args.steps < 2:
        p.error("--steps must be >= 2 (the first step allocates the optimizer state)")
    shape = "quick" if args.quick else "full"
    script = str(Path(__file__).resolve())
    train_rows, gen_rows = [], []
    cores = args.cores.split(",")
    unknown = [c for c in cores if c not in CORES]
    if unknown:
        p.error(f"--cores: unknown {unknown}; choose from {list(CORES)}")
    specs = [{"job": "baseline", "r": BASELINE_R, "k": k} for k in KS]
    specs += [{"job": core, "prior_loss": args.prior_loss} for core in cores]
    for s in specs:
        spec = {**s, "shape": shape, "micro_batch": args.micro_batch, "steps": args.steps}
        print(f"[huginn] training {spec}", file=sys.stderr, flush=True)
        train_rows.append(run_worker(script, spec))
    for job in ("baseline", *cores):
        for n in GEN_STEPS:
            spec = {"kind": "generate", "job": job, "steps_per_token": n, "shape": shape, "prompt": 64}
            spec["new_tokens"] = args.new_tokens
            print(f"[huginn] generation {spec}", file=sys.stderr, flush=True)
            gen_rows.append(run_worker(script, spec))
    name = f"huginn_{shape}.json" if cores == ["diffusion core"] else f"huginn_{shape}_cores.json"
    path = write_results(name, {"shape": SHAPES[shape], "training": train_rows, "generation": gen_rows})
    print(f"\nHuginn training, {shape} shape ({SHAPES[shape]}), micro-batch {args.micro_batch}; MiB")
    print(f"{'job':>30} {'params':>7} {'grads':>7} {'AdamW':>7} {'saved act':>10} {'peak':>8} {'tok/s':>8}")
    for r in train_rows:
        name = f"baseline r={r['r']} k={r['k']}" if r["job"] == "baseline" else f"{r['job']} (any K)"
        print(
            f"{name:>30} {mib(r['parameter_bytes']):>7} {mib(r['gradient_bytes']):>7} {mib(r['optimizer_bytes']):>7} "
            f"{mib(r['saved_activation_bytes']):>10} {mib(r['peak_bytes']):>8} {r['tokens_per_s']:8.0f}"
        )
    print(f"\ngeneration tokens/s (prompt 64, {args.new_tokens} new tokens, KV caches)")
    print(f"{'steps per token':>16} {'baseline (r)':>14}" + "".join(f" {c + ' (K)':>26}" for c in cores))
    for n in GEN_STEPS:
        rate = {r["job"]: r["tokens_per_s"] for r in gen_rows if r["steps_per_token"] == n}
        print(f"{n:>16} {rate['baseline']:14.1f}" + "".join(f" {rate[c]:26.1f}" for c in cores))
    print(f"[huginn] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
