"""The evaluation protocol of a merged model (DiffusionBlocks chain or end-to-end baseline).

Following the paper's LM protocol: held-out prompts, several sampled continuations of `new_tokens` each,
compared with the held-out true continuations by MAUVE; plus the generative perplexity of the samples under
a judge model and the teacher-forced held-out cross-entropy. Every setting is recorded in the result, and two
models compared with `compare=` see the same prompts, seeds and reference features.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from dbscale import families
from dbscale.errors import GenerationError
from dbscale.eval.features import FeaturizerError, load_featurizer, mauve_score
from dbscale.eval.likelihood import require_family
from dbscale.generate import generate_batch, heldout_metrics


@dataclass
class EvalSettings:
    num_prompts: int = 64
    samples_per_prompt: int = 2
    prompt_tokens: int = 32
    new_tokens: int = 50
    temperature: float = 1.0
    top_p: float = 0.95
    seed: int = 0
    featurizer: str = "minilm"
    mauve_scaling_factor: float = 5.0
    heldout_windows: int = 32
    # Featurize the continuation alone: with the shared prompt in both texts, MAUVE rates even gibberish
    # continuations close to the references (measured: 0.94 for a chain at 1% accuracy).
    mauve_text: str = "continuation"
    batch_size: int = 64  # sequences generated per forward pass (the samples do not depend on it)


def heldout_prompts(run, s: EvalSettings) -> tuple[np.ndarray, np.ndarray]:
    """(prompts (N, P), true continuations (N, new)) from fixed windows of the run's validation split."""
    limit = run.config.model.seq_len
    if s.prompt_tokens + s.new_tokens > limit:
        raise GenerationError(
            f"prompt_tokens {s.prompt_tokens} + new_tokens {s.new_tokens} exceed the context of {limit} tokens."
        )
    windows = run.shards("val").fixed_windows(s.num_prompts, s.prompt_tokens + s.new_tokens, seed=777 + s.seed)
    return windows[:, : s.prompt_tokens], windows[:, s.prompt_tokens :]


def sample_continuations(model, prompts: np.ndarray, s: EvalSettings, desc: str) -> np.ndarray:
    """(N * K, new_tokens) sampled continuations; sample k of prompt i uses seed (seed, i, k), generated
    s.batch_size sequences at a time (the same tokens as one at a time)."""
    K = s.samples_per_prompt
    rows = [prompt.tolist() for prompt in prompts for _ in range(K)]
    seeds = [(s.seed * 1_000_003 + i) * 97 + k for i in range(len(prompts)) for k in range(K)]
    bar = tqdm(total=len(rows) * s.new_tokens, desc=desc, unit="tok", leave=False, disable=None)
    out = generate_batch(model, rows, s.new_tokens, s.temperature, s.top_p, seeds, None, s.batch_size, bar)
    bar.close()
    return np.array(out, dtype=np.int64)


@torch.no_grad()
def judge_perplexity(judge, prompts: np.ndarray, continuations: np.ndarray, batch_size: int = 16) -> float:
    """exp(mean CE) of the continuation tokens given their prompts, under a dbscale causal LM."""
    K = len(continuations) // len(prompts)
    full = np.concatenate([np.repeat(prompts, K, axis=0), continuations], axis=1)
    P = prompts.shape[1]
    device = next(judge.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(full), batch_size):
        w = torch.from_numpy(full[i : i + batch_size]).to(device)
        logits = judge(w[:, :-1]).float()[:, P - 1 :]
        total += F.cross_entropy(logits.transpose(1, 2), w[:, P:], reduction="sum").item()
        count += w[:, P:].numel()
    return math.exp(total / count)


@torch.no_grad()
def hf_judge_perplexity(path: str, prompt_texts: list[str], texts: list[str]) -> float:
    """Generative perplexity under any local HF causal LM (its own tokenizer), continuation tokens only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
        lm = AutoModelForCausalLM.from_pretrained(path).eval()
    except Exception as e:
        raise FeaturizerError(
            f"judge '{path}' could not be loaded ({type(e).__name__}). Fix: give a local HF folder, or use a merged "
            "dbscale baseline (--judge R/e2e/merged)."
        ) from None
    total, count = 0.0, 0
    for prompt, text in zip(prompt_texts, texts, strict=True):
        n_prompt = len(tok(prompt)["input_ids"])
        ids = torch.tensor([tok(text)["input_ids"]])
        logits = lm(ids).logits[0, :-1].float()
        targets = ids[0, 1:]
        total += F.cross_entropy(logits[n_prompt - 1 :], targets[n_prompt - 1 :], reduction="sum").item()
        count += len(targets) - (n_prompt - 1)
    return math.exp(total / max(count, 1))


@dataclasses.dataclass(frozen=True)
class Ensemble:
    """An `evaluate` entry: merged plain LMs read as one (dbscale/models/ensemble.py), 'product' or 'mixture'."""

    paths: tuple[str, ...]
    mode: str = "product"


def evaluate(
    model_dirs: list[str | Path | tuple[str | Path, dict]],
    run_dir: str | Path,
    s: EvalSettings,
    judge: str | None = None,
    log=print,
) -> dict:
    """Evaluate one or more merged models with the same prompts, seeds and reference features. An entry may be
    (dir, {"estimate": ..., "step": ..., "steps": ...}) to evaluate a chain with another sampler than its
    config's (steps: sampler steps per token, see DiffusionBlocksLM.set_sample_steps); `dir` may be an Ensemble."""
    from dbscale.merge import load_ensemble, load_merged
    from dbscale.run import open_run

    run = open_run(run_dir)
    family = families.get(run.config.model.family)
    if family.generates != "tokens":
        raise GenerationError(
            f"{run_dir}: the MAUVE protocol of tools/evaluate.py samples continuations token by token; the "
            f"'{family.name}' family generates whole sequences. Fix: use tools/generate.py --bpc and bench/masked.py."
        )
    prompts, references = heldout_prompts(run, s)
    featurizer = load_featurizer(s.featurizer)
    judge_model, judge_name = None, None
    if judge is None and (run.root / "e2e/merged/manifest.json").is_file():
        judge = str(run.root / "e2e/merged")
    if judge is not None:
        if (Path(judge) / "manifest.json").is_file():
            judge_model, judge_tok, judge_manifest = load_merged(judge)
            if judge_manifest["kind"] != "e2e":
                raise GenerationError(f"--judge {judge}: the judge must be a causal LM (an end-to-end baseline).")
            if judge_manifest["tokenizer_sha256"] != run.manifest["tokenizer_sha256"]:
                raise GenerationError(f"--judge {judge}: uses another tokenizer than the run {run.root}.")
            judge_name = f"dbscale end-to-end baseline {judge}"
        else:
            judge_name = f"HF causal LM {judge}"

    tok = None
    results = []
    reference_features = None
    for spec in model_dirs:
        t0 = time.time()
        model_dir, sampler = spec if isinstance(spec, tuple) else (spec, {})
        if isinstance(model_dir, Ensemble):
            model, tok, manifest = load_ensemble(model_dir.paths, model_dir.mode)
        else:
            model, tok, manifest = load_merged(model_dir)
        require_family(manifest, run.config.model.family, f"tools/evaluate.py on {run.root} ({model_dir})")
        if manifest["tokenizer_sha256"] != run.manifest["tokenizer_sha256"]:
            raise GenerationError(f"{model_dir}: uses another tokenizer than the run {run.root}.")
        label = {"blocks": "DiffusionBlocks", "e2e": "end-to-end"}.get(manifest["kind"])
        if manifest["kind"] == "ensemble":
            label = f"ensemble of {len(manifest['members'])} ({manifest['mode']})"
        if manifest["kind"] == "blocks":  # the chain's sampler: the model's config unless the spec overrides it
            model.estimate = sampler.get("estimate", model.estimate)
            model.step = sampler.get("step", model.step)
            if sampler.get("steps") is not None:
                try:
                    model.set_sample_steps(sampler["steps"])
                except ValueError as e:
                    raise GenerationError(f"{model_dir}: {e}.") from None
            if sampler.get("top_k") is not None:
                try:
                    model.set_top_k(sampler["top_k"])
                except ValueError as e:
                    raise GenerationError(f"{model_dir}: {e}.") from None
            sampler = {"estimate": model.estimate, "step": model.step, "steps": len(model.sigmas)}
            if getattr(model, "top_k", None):  # a top-k chain says so; the exact one reads as before
                sampler["top_k"] = model.top_k
        else:
            sampler = None  # a plain LM has no chain sampler: the spec's settings do not apply to it
        log(f"[evaluate] {label} ({model_dir}): sampling {len(prompts)} x {s.samples_per_prompt} continuations")
        t_gen = time.time()
        generated = sample_continuations(model, prompts, s, desc=f"sampling ({label})")
        t_gen = time.time() - t_gen
        log(
            f"[evaluate] {label}: {generated.size:,} tokens in {t_gen:.1f} s ({generated.size / t_gen:,.0f} tok/s, "
            f"batch {s.batch_size})"
        )
        prompt_texts = [tok.decode(p.tolist()) for p in prompts]
        ref_texts = [tok.decode(np.concatenate([p, r]).tolist()) for p, r in zip(prompts, references, strict=True)]
        gen_prompts = [t for t in prompt_texts for _ in range(s.samples_per_prompt)]
        gen_texts = [
            tok.decode(np.concatenate([p, g]).tolist())
            for p, g in zip(np.repeat(prompts, s.samples_per_prompt, axis=0), generated, strict=True)
        ]
        if s.mauve_text == "continuation":
            ref_feats_in = [t[len(p) :] for t, p in zip(ref_texts, prompt_texts, strict=True)]
            gen_feats_in = [t[len(p) :] for t, p in zip(gen_texts, gen_prompts, strict=True)]
        else:
            ref_feats_in, gen_feats_in = ref_texts, gen_texts
        if reference_features is None:
            reference_features = featurizer(ref_feats_in, desc="featurizing references")
        gen_features = featurizer(gen_feats_in, desc=f"featurizing ({label})")
        log(f"[evaluate] {label}: MAUVE")
        mauve = mauve_score(reference_features, gen_features, seed=25 + s.seed, scaling_factor=s.mauve_scaling_factor)
        result = {
            "model": ",".join(model_dir.paths) if isinstance(model_dir, Ensemble) else str(model_dir),
            "label": label,
            "sampler": sampler or None,
            "mauve": {**mauve, "label": featurizer.label, "featurizer": s.featurizer},
            "heldout": heldout_metrics(
                model,
                run.shards("val").fixed_windows(s.heldout_windows, run.config.model.seq_len + 1, seed=12345),
                temperature=s.temperature,
                top_p=s.top_p,
            ),
            "distinct_4grams": distinct_ngrams(generated, 4),
            "samples": [
                {
                    "prompt": prompt_texts[i],
                    "continuation": gen_texts[i * s.samples_per_prompt][len(prompt_texts[i]) :],
                    "reference": ref_texts[i][len(prompt_texts[i]) :],
                }
                for i in range(min(5, len(prompts)))
            ],
        }
        if judge_model is not None:
            result["generative_perplexity"] = judge_perplexity(judge_model, prompts, generated)
            result["reference_perplexity"] = judge_perplexity(judge_model, prompts, references)
        elif judge is not None:
            result["generative_perplexity"] = hf_judge_perplexity(judge, gen_prompts, gen_texts)
            result["reference_perplexity"] = hf_judge_perplexity(judge, prompt_texts, ref_texts)
        result["generation"] = {"seconds": round(t_gen, 2), "tokens_per_s": round(generated.size / t_gen, 1)}
        result["time_s"] = round(time.time() - t0, 1)
        results.append(result)
    return {
        "run": str(run.root),
        "settings": dataclasses.asdict(s),
        "judge": judge_name,
        "protocol": "prompts: fixed held-out windows of the run's validation split; references: the true "
        f"continuations of the same prompts; MAUVE featurizes the {s.mauve_text.replace('+', ' + ')}",
        "results": results,
    }


def distinct_ngrams(sequences: np.ndarray, n: int) -> float:
    """Fraction of distinct token n-grams among all n-grams of the samples (1.0 = no repetition)."""
    grams = [tuple(seq[i : i + n]) for seq in sequences.tolist() for i in range(len(seq) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


def format_table(report: dict) -> str:
    """The comparison table. 'held-out CE' is a plain LM's cross-entropy; a chain's last step is one-hot, so
    its column shows the cross-entropy of its first step (block 0 from the context alone), marked '*'."""
    rows = report["results"]
    label = rows[0]["mauve"]["label"] if rows else "MAUVE"
    head = (
        f"{'model':38} {label:>24} {'gen. ppl':>9} {'ref. ppl':>9} {'held-out CE':>11} {'greedy acc':>10} "
        f"{'sample acc':>10} {'distinct-4':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        gp, rp, h = r.get("generative_perplexity"), r.get("reference_perplexity"), r["heldout"]
        ce = f"{h['ce']:.3f}" if h.get("ce") is not None else f"{h['first_step_ce']:.3f}*"
        sampler = r.get("sampler")
        if sampler:  # reports written before the step count was recorded have no 'steps'
            steps = f", {sampler['steps']} steps" if sampler.get("steps") else ""
            name = f"{r['label']} ({sampler['estimate']}, {sampler['step']}{steps})"
        else:
            name = r["label"]
        lines.append(
            f"{name:38} {r['mauve']['mauve']:24.3f} {'-' if gp is None else f'{gp:9.1f}':>9} "
            f"{'-' if rp is None else f'{rp:9.1f}':>9} {ce:>11} {h['accuracy']:10.3f} {h['sample_accuracy']:10.3f} "
            f"{r['distinct_4grams']:10.3f}"
        )
    s = report["settings"]
    lines.append(
        f"{s['num_prompts']} prompts of {s['prompt_tokens']} tokens x {s['samples_per_prompt']} samples of "
        f"{s['new_tokens']} tokens, temperature {s['temperature']}, top-p {s['top_p']}; judge: {report['judge']}"
    )
    if any(r["heldout"].get("ce") is None for r in rows):
        lines.append(
            "* a chain's last step is (nearly) one-hot, so its cross-entropy is no likelihood: shown is its first "
            "step's (block 0 at sigma_max, from the context alone). Sample acc: a token drawn at the temperature "
            "above is the true one (a plain LM: its expectation; a chain: one draw per position)."
        )
    return "\n".join(lines)
