"""Likelihood of the masked family: the NELBO in bits per character, with its Monte Carlo standard error,
and text generation (unconditional, prefix-conditioned, infilling) through the blocks' ancestral sampler."""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from dbscale.errors import GenerationError

INFILL_MARK = "_"


def require_family(manifest: dict, family: str, what: str) -> None:
    """A clear error when a merged model of one family is handed to another family's tool."""
    got = manifest.get("family", "llama")
    if got != family:
        raise GenerationError(
            f"{what} needs a '{family}' model, but this merged model is of the '{got}' family. Fix: use the "
            f"{got} family's tools (tools/generate.py picks them from the model's manifest)."
        )


@torch.no_grad()
def masked_bpc(model, windows: np.ndarray, num_t: int = 8, seed: int = 0, batch_size: int = 16) -> dict:
    """NELBO of (N, T) validation windows under a merged masked model, in bits per token (= per character
    for a char tokenizer): the mean over windows of the per-window estimate (sum over blocks of `num_t`
    stratified t samples in each block's slice), and its standard error over windows."""
    if num_t < 1:
        raise ValueError("num_t must be >= 1")
    device = next(model.parameters()).device
    per_window = []
    for i in range(0, len(windows), batch_size):
        w = torch.from_numpy(windows[i : i + batch_size]).long().to(device)
        per_window.append(model.nelbo_per_window(w, num_t, seed=seed + i))
    nats = torch.cat(per_window).numpy() / math.log(2)
    n = len(nats)
    return {
        "bits_per_token": float(nats.mean()),
        "stderr": float(nats.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
        "windows": n,
        "tokens_per_window": int(windows.shape[1]),
        "t_samples_per_block": num_t,
        "blocks": model.num_blocks,
        "t_min": model.cfg.diffusion.t_min,
    }


def known_from_text(tokenizer, length: int, prompt: str | None = None, template: str | None = None) -> np.ndarray:
    """Positions fixed before sampling, -1 elsewhere: a prefix (`prompt`) or an infilling `template` whose
    '_' characters are to be filled (its other characters are kept where they stand)."""
    known = np.full(length, -1, dtype=np.int64)
    if prompt is not None and template is not None:
        raise GenerationError("give a prompt (prefix) or an infilling template, not both.")
    text = prompt if prompt is not None else template
    if text is None:
        return known
    if len(text) > length:
        raise GenerationError(
            f"the {'prompt' if prompt is not None else 'template'} has {len(text)} characters, longer than the "
            f"{length} being sampled (--length, at most model.seq_len). Fix: shorten it or raise --length."
        )
    if template is not None:
        for i, c in enumerate(template):
            if c != INFILL_MARK:
                known[i] = _encode_checked(tokenizer, c)[0]
        if (known[: len(template)] >= 0).all():
            raise GenerationError(f"the template has no '{INFILL_MARK}' to fill.")
        return known
    known[: len(text)] = _encode_checked(tokenizer, text)
    return known


def _encode_checked(tokenizer, text: str):
    ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    if len(ids) != len(text):
        raise GenerationError("prefix and infilling need a character tokenizer (one id per character).")
    return ids


def masked_generate(
    model,
    tokenizer,
    num_samples: int = 1,
    length: int | None = None,
    steps: int | None = None,
    prompt: str | None = None,
    template: str | None = None,
    seed: int = 0,
    use_cache: bool = False,
    progress=None,
) -> list[dict]:
    """Sample `num_samples` texts of `length` characters; returns dicts with the text and timings."""
    limit = model.cfg.model.seq_len
    length = length or limit
    if length > limit:
        raise GenerationError(f"--length {length} exceeds the model's context of {limit} (model.seq_len).")
    steps = steps or model.default_steps()
    if steps < model.num_blocks:
        raise GenerationError(
            f"{steps} sampling steps cannot visit all {model.num_blocks} blocks (each block serves at least one "
            f"step). Fix: use --steps >= {model.num_blocks}."
        )
    known_row = torch.from_numpy(known_from_text(tokenizer, length, prompt, template))
    known = known_row.expand(num_samples, length).clone()
    calls0 = model.model_calls
    t0 = time.time()
    try:
        x = model.sample(num_samples, length, steps, seed=seed, known=known, use_cache=use_cache, progress=progress)
    except ValueError as e:
        raise GenerationError(str(e)) from None
    dt = time.time() - t0
    return [
        {
            "text": tokenizer.decode(row.tolist()),
            "prompt": prompt,
            "template": template,
            "steps": steps,
            "cached": use_cache,
            "model_calls": model.model_calls - calls0,
            "time_s": round(dt, 4),
            "steps_per_s": round(steps / dt, 2) if dt > 0 else None,
        }
        for row in x
    ]
