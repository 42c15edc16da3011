"""Sequential inference with a merged model (DiffusionBlocks chain or end-to-end baseline).

Both models share one interface: `new_cache()` and `next_token_logits(cache, new_tokens, seed)`. The
chain makes B block calls per token (one Euler step per block), each step with its own KV cache.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from dbscale.diffusion.sampler import nucleus
from dbscale.errors import GenerationError


def pick_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Greedy when temperature == 0 (the paper's setting), else temperature / nucleus sampling."""
    if temperature <= 0:
        return int(logits.argmax(-1).item())
    probs = nucleus(F.softmax(logits.float().view(-1) / temperature, dim=-1), top_p)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def context_limit(model) -> int:
    return model.context_length


def check_prompt_length(model, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse a prompt that cannot be continued by max_new_tokens within the model's context."""
    limit = context_limit(model)
    if prompt_tokens == 0:
        raise GenerationError("the prompt is empty after tokenization.")
    if prompt_tokens >= limit:
        raise GenerationError(
            f"the prompt is {prompt_tokens} tokens (with the leading document separator) and fills the context of "
            f"{limit} tokens (model.seq_len). Fix: shorten the prompt to at most {limit - 1} tokens."
        )
    if prompt_tokens + max_new_tokens > limit:
        raise GenerationError(
            f"the prompt is {prompt_tokens} tokens; + {max_new_tokens} new tokens exceeds the context of {limit} "
            f"tokens (model.seq_len). Fix: lower --max-new-tokens to {limit - prompt_tokens}, or shorten the prompt."
        )


@torch.no_grad()
def generate_ids(
    model,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_id: int | None = None,
    use_cache: bool = True,
    progress: tqdm | None = None,
) -> list[int]:
    """Continue `prompt_ids` by up to max_new_tokens. Without the cache every step recomputes the whole
    context (a reference for tests); with the same seed both give the same tokens."""
    check_prompt_length(model, len(prompt_ids), max_new_tokens)
    device = next(model.parameters()).device
    sampler = torch.Generator(device="cpu").manual_seed(seed)
    ids = list(prompt_ids)
    cache = model.new_cache()
    sampling = {"temperature": temperature, "top_p": top_p}  # the chain samples inside (its estimates)
    logits = model.next_token_logits(cache, torch.tensor([ids], device=device), seed, **sampling)
    out: list[int] = []
    for _ in range(max_new_tokens):
        tok = pick_token(logits.cpu(), temperature, top_p, sampler)
        out.append(tok)
        ids.append(tok)
        if progress is not None:
            progress.update(1)
        if (eos_id is not None and tok == eos_id) or len(out) == max_new_tokens:
            break
        if use_cache:
            logits = model.next_token_logits(cache, torch.tensor([[tok]], device=device), seed, **sampling)
        else:
            cache = model.new_cache()
            logits = model.next_token_logits(cache, torch.tensor([ids], device=device), seed, **sampling)
    return out


@torch.no_grad()
def heldout_metrics(
    model, windows: np.ndarray, batch_size: int = 8, seed: int = 0, temperature: float = 1.0, top_p: float = 1.0
) -> dict:
    """Teacher-forced next-token figures on (N, T+1) windows, comparable between a plain LM and a chain.

    - accuracy: the greedy prediction (temperature 0) is the true token;
    - sample_accuracy: a token drawn at `temperature` / `top_p` is the true token (for a plain LM its exact
      expectation, the probability its sampling distribution gives the true token; for a chain one draw of
      the whole chain per position);
    - ce / ppl (nats/token): a plain LM's cross-entropy. A chain's last step is (nearly) one-hot, so its
      cross-entropy is not a likelihood and is not reported; `first_step_ce` is the cross-entropy of the
      chain's first step, where block 0 at sigma_max predicts from the context alone: a likelihood of that
      block read as a language model.
    """
    device = next(model.parameters()).device
    chain = hasattr(model, "teacher_forced_logits")
    sums = {"ce": 0.0, "correct": 0.0, "sample_correct": 0.0}
    total = 0
    for i in range(0, len(windows), batch_size):
        w = torch.from_numpy(windows[i : i + batch_size]).to(device)
        targets = w[:, 1:]
        if chain:
            first = {}

            def keep_first(step, block, sigma, logits, first=first):
                first.setdefault("logits", logits)

            greedy = model.teacher_forced_logits(w, seed=seed + i, temperature=0.0, on_step=keep_first)
            sampled = model.teacher_forced_logits(w, seed=seed + i, temperature=temperature, top_p=top_p)
            sums["ce"] += F.cross_entropy(first["logits"].float().flatten(0, 1), targets.flatten(), reduction="sum")
            sums["correct"] += (greedy.argmax(-1) == targets).sum().item()
            sums["sample_correct"] += (sampled.argmax(-1) == targets).sum().item()
        else:
            logits = model(w[:, :-1]).float()
            sums["ce"] += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
            sums["correct"] += (logits.argmax(-1) == targets).sum().item()
            if temperature > 0:
                probs = nucleus(F.softmax(logits / temperature, dim=-1), top_p)
                sums["sample_correct"] += probs.gather(-1, targets[..., None]).sum().item()
            else:
                sums["sample_correct"] += (logits.argmax(-1) == targets).sum().item()
        total += targets.numel()
    ce = float(sums["ce"]) / total
    out = {
        "accuracy": sums["correct"] / total,
        "sample_accuracy": sums["sample_correct"] / total,
        "temperature": temperature,
        "top_p": top_p,
        "tokens": int(total),
    }
    if chain:
        out.update(ce=None, ppl=None, first_step_ce=ce)
    else:
        out.update(ce=ce, ppl=math.exp(min(ce, 50)))
    return out


@torch.no_grad()
def chain_diagnostics(model, windows: np.ndarray, seed: int = 0) -> list[dict]:
    """Per sampler step of a DiffusionBlocks chain run greedily: cross-entropy and accuracy of that step's
    logits when the block is fed the chain's own state, next to the same block fed a correctly noised target
    (y + sigma * eps). A gap shows where the chain's state leaves the distribution a block was trained on."""
    device = next(model.parameters()).device
    w = torch.from_numpy(windows).to(device)
    context, targets = w[:, :-1], w[:, 1:]
    E = model.target_embedding
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    rows = []

    def record(step, block, sigma, logits):
        s = torch.full((len(w),), sigma, device=device)
        oracle_z = E[targets] + sigma * torch.randn(*targets.shape, E.shape[1], generator=g).to(device)
        _, oracle = model.blocks[block](context, oracle_z, s)
        row = {"step": step, "block": block, "sigma": sigma}
        for name, lg in (("chain", logits.float()), ("noised_target", oracle.float())):
            row[f"{name}_ce"] = F.cross_entropy(lg.transpose(1, 2), targets).item()
            row[f"{name}_accuracy"] = (lg.argmax(-1) == targets).float().mean().item()
        rows.append(row)

    model.teacher_forced_logits(w, seed=seed, temperature=0.0, on_step=record)
    return rows


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The ids a text prompt is generated from: EOS (the document separator seen in training), then the text."""
    return [tokenizer.eos_id, *tokenizer.encode(prompt)]


def timed_generate(model, tokenizer, prompt: str, **kw) -> dict:
    """Generate from text (see prompt_ids)."""
    ids = prompt_ids(tokenizer, prompt)
    t0 = time.time()
    out = generate_ids(model, ids, eos_id=tokenizer.eos_id, **kw)
    dt = time.time() - t0
    completion_ids = out[:-1] if out and out[-1] == tokenizer.eos_id else out
    # Decode prompt and completion together: sentencepiece drops the leading space of a lone first piece.
    completion = tokenizer.decode(ids + completion_ids)[len(tokenizer.decode(ids)) :]
    return {
        "prompt": prompt,
        "completion": completion,
        "new_tokens": len(out),
        "time_s": round(dt, 4),
        "tokens_per_s": round(len(out) / dt, 2) if dt > 0 else None,
    }
