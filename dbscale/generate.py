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

from dbscale.errors import GenerationError


def pick_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Greedy when temperature == 0 (the paper's setting), else temperature / nucleus sampling."""
    if temperature <= 0:
        return int(logits.argmax(-1).item())
    probs = F.softmax(logits.float().view(-1) / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p  # smallest prefix with mass >= top_p
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator).item())


def context_limit(model) -> int:
    return model.cfg.seq_len if hasattr(model.cfg, "seq_len") else model.cfg.model.seq_len


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
    limit = context_limit(model)
    if not prompt_ids:
        raise GenerationError("the prompt is empty after tokenization.")
    if len(prompt_ids) + max_new_tokens > limit:
        raise GenerationError(
            f"prompt of {len(prompt_ids)} tokens + {max_new_tokens} new tokens exceeds the context of "
            f"{limit} tokens (model.seq_len). Fix: shorten the prompt or lower --max-new-tokens to "
            f"{max(0, limit - len(prompt_ids))}."
        )
    device = next(model.parameters()).device
    sampler = torch.Generator(device="cpu").manual_seed(seed)
    ids = list(prompt_ids)
    cache = model.new_cache()
    logits = model.next_token_logits(cache, torch.tensor([ids], device=device), seed)
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
            logits = model.next_token_logits(cache, torch.tensor([[tok]], device=device), seed)
        else:
            cache = model.new_cache()
            logits = model.next_token_logits(cache, torch.tensor([ids], device=device), seed)
    return out


@torch.no_grad()
def heldout_metrics(model, windows: np.ndarray, batch_size: int = 8, seed: int = 0) -> dict:
    """Teacher-forced next-token cross-entropy (nats/token) and greedy accuracy on (N, T+1) windows.

    For the chain this is the cross-entropy of its final-step distribution with one noise draw per position.
    """
    device = next(model.parameters()).device
    total_ce = total_correct = total = 0.0
    for i in range(0, len(windows), batch_size):
        w = torch.from_numpy(windows[i : i + batch_size]).to(device)
        if hasattr(model, "teacher_forced_logits"):
            logits = model.teacher_forced_logits(w, seed=seed + i)
        else:
            logits = model(w[:, :-1]).float()
        targets = w[:, 1:]
        total_ce += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        total_correct += (logits.argmax(-1) == targets).sum().item()
        total += targets.numel()
    ce = total_ce / total
    return {"ce": ce, "ppl": math.exp(min(ce, 50)), "accuracy": total_correct / total, "tokens": int(total)}


@torch.no_grad()
def chain_diagnostics(model, windows: np.ndarray, seed: int = 0) -> list[dict]:
    """Per sampler step of a DiffusionBlocks chain: cross-entropy and accuracy of that step's logits when
    the block is fed the chain's own state, next to the same block fed a correctly noised target
    (y + sigma * eps). A gap shows where the chain's state leaves the distribution a block was trained on."""
    from dbscale.diffusion.sampler import euler_step

    device = next(model.parameters()).device
    w = torch.from_numpy(windows).to(device)
    context, targets = w[:, :-1], w[:, 1:]
    B, T = context.shape
    E = model.target_embedding
    g = torch.Generator(device="cpu").manual_seed(seed)
    z = (torch.randn(B, T, E.shape[1], generator=g) * model.sigmas[0]).to(device)
    rows = []
    for k, (sigma, block) in enumerate(zip(model.sigmas, model.step_blocks, strict=True)):
        s = torch.full((B,), sigma, device=device)
        _, logits = model.blocks[block](context, z, s)
        oracle_z = E[targets] + sigma * torch.randn(z.shape, generator=g).to(device)
        _, oracle = model.blocks[block](context, oracle_z, s)
        row = {"step": k, "block": block, "sigma": sigma}
        for name, lg in (("chain", logits.float()), ("noised_target", oracle.float())):
            row[f"{name}_ce"] = F.cross_entropy(lg.transpose(1, 2), targets).item()
            row[f"{name}_accuracy"] = (lg.argmax(-1) == targets).float().mean().item()
        rows.append(row)
        if k + 1 < len(model.sigmas):
            z = euler_step(z, logits.float().softmax(-1) @ E, sigma, model.sigmas[k + 1])
    return rows


def timed_generate(model, tokenizer, prompt: str, **kw) -> dict:
    """Generate from text; the prompt is preceded by EOS, the document separator seen in training."""
    ids = [tokenizer.eos_id, *tokenizer.encode(prompt)]
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
