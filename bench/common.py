"""Shared by the performance benches: shapes, one measured training job per fresh process, JSON + tables.

Every measurement runs in its own process (`python bench/<script>.py --worker JSON`), so the peak RSS of one
job never includes another's. A worker builds one job's model exactly as the trainer does (the end-to-end
LlamaLM for B=1, one DenoiserBlock of L/B layers otherwise), trains it for a few AdamW steps on random
tokens, and measures:
- parameter, gradient, optimizer-state and buffer bytes (tensors as allocated after a step);
- saved-activation bytes of one training step (autograd saved-tensor hooks, parameters excluded);
- peak memory: CUDA max_memory_allocated on a GPU; on CPU the peak RSS and its rise over the RSS
  measured just before the model was built (the Python and torch runtime is not the job's memory);
- median step time and training tokens/s (tokens = predicted positions, B x T per micro-batch).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

# The paper's Llama shape (docs/METHOD.md 7a) and a quick one that runs in seconds on a laptop CPU.
SHAPES = {
    "full": {"n_layers": 12, "d_model": 768, "n_heads": 12, "seq_len": 256, "vocab": 32000},
    "quick": {"n_layers": 12, "d_model": 192, "n_heads": 4, "seq_len": 128, "vocab": 8000},
}

# The masked family at the paper's text8 shape (docs/METHOD.md 7b): 27 characters (the mask is an extra input id).
MASKED_SHAPES = {
    "full": {"n_layers": 12, "d_model": 768, "n_heads": 12, "seq_len": 256, "vocab": 27},
    "quick": {"n_layers": 12, "d_model": 192, "n_heads": 4, "seq_len": 128, "vocab": 27},
}
MASKED_LEVELS = ("paper", "checkpointing")  # chunked CE and the target table do not apply to 27 outputs

# Cumulative switch levels of a block job; the end-to-end job takes the ones that apply to it.
LEVELS = {
    "paper": {},
    "ce_chunk": {"ce_chunk": 256},
    "checkpointing": {"ce_chunk": 256, "activation_checkpointing": True},
    "target_head": {"ce_chunk": 256, "activation_checkpointing": True, "head": "target"},
    "target_context": {
        "ce_chunk": 256,
        "activation_checkpointing": True,
        "head": "target",
        "context_embedding": "target",
    },
}
E2E_LEVELS = ("paper", "ce_chunk", "checkpointing")

# The families bench/memory.py measures: their shapes, the switch levels a block job takes and those its baseline
# takes (the Huginn family's memory, per BPTT length, is measured by bench/huginn.py).
MEMORY_BENCH = {
    "llama": {"shapes": SHAPES, "levels": tuple(LEVELS), "e2e_levels": E2E_LEVELS},
    "masked": {"shapes": MASKED_SHAPES, "levels": MASKED_LEVELS, "e2e_levels": MASKED_LEVELS},
}


def device_info() -> dict:
    import torch

    info = {"platform": platform.platform(), "torch": torch.__version__, "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        info.update(device="cuda", gpu=torch.cuda.get_device_name(0))
    else:
        info.update(device="cpu", threads=torch.get_num_threads())
    return info


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def bench_job(family_name: str, shape: dict, B: int, model_keys: dict, device):
    """(family, job, model) of one measured training job: the end-to-end baseline for B = 1, block 0 of B
    otherwise, built by the family as the trainer builds it, over the whole noise range."""
    from dbscale import families
    from dbscale.config import Config, DiffusionConfig, ModelConfig
    from dbscale.diffusion.masking import MaskSchedule
    from dbscale.diffusion.noise import frozen_target_embedding

    family = families.get(family_name)
    model_cfg = ModelConfig(
        family=family_name,
        n_layers=shape["n_layers"],
        d_model=shape["d_model"],
        n_heads=shape["n_heads"],
        seq_len=shape["seq_len"],
        **model_keys,
    )
    cfg = Config(model=model_cfg, diffusion=DiffusionConfig(num_blocks=B))
    V = shape["vocab"]
    block = None if B == 1 else 0
    interval = (0.0, 1.0) if family.space == "t" else (cfg.diffusion.sigma_min, cfg.diffusion.sigma_max)
    job = families.Job(cfg, V, block, interval, {"schedule": MaskSchedule()})
    if family.target_table:
        job.extras["table"] = frozen_target_embedding(V, model_cfg.embed_dim, 0).to(device)
    return family, job, family.build(job)


def _warm_up_runtime(device) -> None:
    """One tiny training step of each model kind, with every switch, so lazily loaded code is resident."""
    import torch

    from dbscale.families import StepInfo

    shape = {"n_layers": 2, "d_model": 64, "n_heads": 2, "seq_len": 16, "vocab": 128}
    for B in (1, 2):
        family, job, model = bench_job("llama", shape, B, {"head": "target", "context_embedding": "target"}, device)
        model.to(device)
        opt = torch.optim.AdamW(model.parameters())
        for checkpointing, chunk in ((False, 0), (True, 8)):
            model.activation_checkpointing = checkpointing
            job.cfg.train.ce_chunk = chunk
            window = torch.randint(0, 128, (2, 17), device=device)
            loss = family.loss(job, model, window, family.draw(job, window, 0), StepInfo(0, 0, 0))[0]
            loss.backward()
            opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def measure_job(spec: dict) -> dict:
    """One training job of `spec` = {shape, B, level, micro_batch, steps >= 2, dtype}; returns the measurements."""
    import torch

    from dbscale.families import StepInfo
    from dbscale.profiling import count_flops, saved_activation_bytes, state_bytes

    family_name = spec.get("family", "llama")
    shapes = MEMORY_BENCH[family_name]["shapes"]
    shape = shapes[spec["shape"]] if isinstance(spec["shape"], str) else spec["shape"]
    B, level, mb = spec["B"], LEVELS[spec["level"]], spec["micro_batch"]
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if (cuda and spec.get("dtype", "auto") != "fp32") else torch.float32
    model_keys = {k: level[k] for k in ("head", "context_embedding") if k in level}
    model_keys.update(spec.get("model", {}))  # e.g. {"target_dim": 128}: a block's target space narrower than d
    V, T = shape["vocab"], shape["seq_len"]
    from dbscale.train.host_memory import set_mmap_threshold

    set_mmap_threshold(spec.get("host_mmap_threshold", 65536))  # as the trainer does (train.host_mmap_threshold)
    _warm_up_runtime(device)  # load kernels and thread pools first: they are the runtime's memory, not the job's
    torch.manual_seed(0)
    rss0 = rss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    family, job, model = bench_job(family_name, shape, B, model_keys, device)
    job.cfg.train.ce_chunk = level.get("ce_chunk", 0)
    job.cfg.diffusion.noisy_fraction = spec.get("noisy_fraction", 1.0)
    job.cfg.diffusion.prior_loss = spec.get("prior_loss", job.cfg.diffusion.prior_loss)
    model.activation_checkpointing = bool(level.get("activation_checkpointing"))
    model.to(device=device, dtype=dtype)
    cfg = job.cfg.model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator(device="cpu").manual_seed(1)
    length = family.window_length(job.cfg)

    def loss_fn(window, step):
        return family.loss(job, model, window, family.draw(job, window, step), StepInfo(0, step, 0))[0]

    times, saved = [], None
    for step in range(spec["steps"]):
        window = torch.randint(0, V, (mb, length), generator=g).to(device)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        holder = {}
        if step == 1:  # one step after the optimizer state exists: the steady state
            held = [*model.parameters(), *model.buffers()]  # counted as state, not as activations
            saved = saved_activation_bytes(lambda h=holder, w=window: h.update(loss=loss_fn(w, 1)), held)
        else:
            holder["loss"] = loss_fn(window, step)
        holder["loss"].backward()
        states = state_bytes(model, opt) if step == 1 else None
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if states is not None:
            kept_states = states
    steady = times[1:] if len(times) > 1 else times
    step_s = statistics.median(steady)
    out = {
        **spec,
        "dtype": str(dtype).replace("torch.", ""),
        "layers": cfg.n_layers if B == 1 else cfg.n_layers // B,
        "trainable_parameters": kept_states["trainable_parameters"],
        "parameter_bytes": kept_states["parameters"],
        "gradient_bytes": kept_states["gradients"],
        "optimizer_bytes": kept_states["optimizer"],
        "buffer_bytes": kept_states["buffers"],
        "saved_activation_bytes": saved["bytes"],
        "largest_saved_tensor_bytes": saved["largest"],
        "step_s": step_s,
        "tokens_per_s": mb * T / step_s,
    }
    out["state_plus_activation_bytes"] = (
        out["parameter_bytes"] + out["gradient_bytes"] + out["optimizer_bytes"] + out["buffer_bytes"]
    ) + out["saved_activation_bytes"]
    if cuda:
        out["peak_bytes"] = torch.cuda.max_memory_allocated()
        out["peak_kind"] = "cuda_max_memory_allocated"
    else:
        out["peak_rss_bytes"] = peak_rss_bytes()
        out["peak_bytes"] = out["peak_rss_bytes"] - rss0
        out["peak_kind"] = "peak RSS minus RSS before the model was built"
    # one more step, untimed and after the peak was read: the FLOPs its forward and backward execute
    window = torch.randint(0, V, (mb, length), generator=g).to(device)
    out["flops_per_step"] = count_flops(lambda: loss_fn(window, spec["steps"]).backward())
    out["flops_per_s"] = out["flops_per_step"] / step_s
    return out


# Dense bf16 tensor-core peaks from NVIDIA's datasheets (H100 SXM5 and H200 SXM: 989.4 TFLOP/s; H100 PCIe: 756),
# matched on torch.cuda.get_device_name; the denominator of the usual MFU (model FLOPs per second / peak).
DATASHEET_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100", 989.4e12), ("H200", 989.4e12))


def datasheet_peak_flops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((peak for key, peak in DATASHEET_BF16_FLOPS if key in name), None)


def matmul_peak_flops(repeats: int = 10) -> dict:
    """The FLOP/s this device reaches on one large square product in the jobs' dtype (bf16 on a GPU, fp32 on a
    CPU): a measured ceiling for the jobs' FLOP/s, the fastest of `repeats` products after a warm-up (on a
    shared machine the others only show what a neighbour took)."""
    import torch

    cuda = torch.cuda.is_available()
    n, dtype = (8192, torch.bfloat16) if cuda else (2048, torch.float32)
    device = "cuda" if cuda else "cpu"
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(repeats + 1):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if cuda:
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "flops_per_s": 2 * n**3 / min(times)}


def parse_or_measure(parser, measure):
    """A bench's command line. With the hidden --worker SPEC (how run_worker starts a measurement in a fresh
    process) it runs measure(SPEC) here, prints the result as the JSON line run_worker reads, and returns None;
    otherwise it returns the parsed arguments."""
    import argparse

    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))))
        return None
    return args


def run_worker(script: str, spec: dict, timeout: int = 3600) -> dict:
    """Run one measurement in a fresh process; returns its JSON result (or raises with its stderr)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    p = subprocess.run(
        [sys.executable, script, "--worker", json.dumps(spec)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if p.returncode != 0:
        raise RuntimeError(f"worker {spec} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def results_path(name: str) -> Path:
    """Where a bench's result file lives: bench/results/<name>, or under $DBSCALE_BENCH_RESULTS (a trial run
    that must not replace the tables); a GPU run's file is <name>_cuda.json, so it never overwrites (or resumes
    from) the CPU table of the same bench."""
    import torch

    if torch.cuda.is_available() and not name.endswith("_cuda.json"):
        name = name.removesuffix(".json") + "_cuda.json"
    return Path(os.environ.get("DBSCALE_BENCH_RESULTS") or RESULTS) / name


def write_results(name: str, payload: dict) -> Path:
    """Write results_path(name) with the command that made it and the machine."""
    path = results_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    from dbscale.commands import invocation

    command = invocation()  # how to produce it again
    made = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": git_commit()}
    record = {"command": command, **payload, "device_info": device_info(), **made}
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def git_commit() -> str | None:
    """The checkout's commit, with '+dirty' when tracked files differ from it (None outside a git checkout)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=ROOT, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"
