"""Sequential inference with a merged model (DiffusionBlocks chain or end-to-end baseline).

Both models share one interface: `new_cache()` and `next_token_logits(cache, new_tokens, seed)`. The
chain makes B block calls per token (one Euler step per block), each step with its own KV cache.
"""

from __future__ import annotations

import math

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
    context (a reference for tests); with the same seed both give the same tokens, as does generate_batch."""
    if use_cache:
        return generate_batch(model, [prompt_ids], max_new_tokens, temperature, top_p, [seed], eos_id, 1, progress)[0]
    check_prompt_length(model, len(prompt_ids), max_new_tokens)
    device = next(model.parameters()).device
    sampler = torch.Generator(device="cpu").manual_seed(seed)
    ids = list(prompt_ids)
    sampling = {"temperature": temperature, "top_p": top_p}  # the chain samples inside (its estimates)
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = model.next_token_logits(model.new_cache(), torch.tensor([ids], device=device), seed, **sampling)
        tok = pick_token(logits.cpu(), temperature, top_p, sampler)
        out.append(tok)
        ids.append(tok)
        if progress is not None:
            progress.update(1)
        if eos_id is not None and tok == eos_id:
            break
    return out


@torch.no_grad()
def generate_batch(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seeds: list[int] | None = None,
    eos_id: int | None = None,
    batch_size: int = 64,
    progress: tqdm | None = None,
) -> list[list[int]]:
    """Continue every prompt by up to max_new_tokens, batch_size sequences per forward pass.

    Sequence r uses seeds[r] (default: r) for its token draws and its chain's noise, exactly as generate_ids
    with that seed would: the tokens do not depend on the batch a sequence runs in (tested). Prompts are
    grouped by length (the batch shares one set of positions and KV caches without padding); a sequence that
    reaches eos_id stops there (its row keeps running until its batch ends, its extra tokens are dropped).
    Returns the new tokens of each prompt, in the order given."""
    if batch_size < 1:
        raise GenerationError(f"batch size must be >= 1, got {batch_size}.")
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    if len(seeds) != len(prompts):
        raise GenerationError(f"{len(seeds)} seeds for {len(prompts)} prompts.")
    for prompt in prompts:
        check_prompt_length(model, len(prompt), max_new_tokens)
    device = next(model.parameters()).device
    sampling = {"temperature": temperature, "top_p": top_p}  # the chain samples inside (its estimates)
    by_length: dict[int, list[int]] = {}
    for r, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(r)
    outputs: list[list[int]] = [[] for _ in prompts]
    for rows in by_length.values():
        for i in range(0, len(rows), batch_size):
            batch = rows[i : i + batch_size]
            samplers = [torch.Generator(device="cpu").manual_seed(seeds[r]) for r in batch]
            batch_seeds = [seeds[r] for r in batch]
            cache = model.new_cache()
            new = torch.tensor([prompts[r] for r in batch], device=device)
            running = list(range(len(batch)))
            for step in range(max_new_tokens):
                logits = model.next_token_logits(cache, new, batch_seeds, **sampling).cpu()
                tokens = [pick_token(logits[j], temperature, top_p, samplers[j]) for j in range(len(batch))]
                for j in running:
                    outputs[batch[j]].append(tokens[j])
                if progress is not None:
                    progress.update(len(running))
                running = [j for j in running if eos_id is None or tokens[j] != eos_id]
                if not running or step == max_new_tokens - 1:
                    break
                new = torch.tensor([[t] for t in tokens], device=device)
    return outputs


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
    (y + sigma * eps). A gap shows where the chain's state leaves the distribution a block was trained on.
    With dbscale's posterior readout, `prior_ce` / `prior_accuracy` score the block's prior alone (its logits
    without the Gaussian evidence <z, E_v> / sigma^2): what the block predicts from the context at that sigma."""
    from dbscale import families

    device = next(model.parameters()).device
    w = torch.from_numpy(windows).to(device)
    context, targets = w[:, :-1], w[:, 1:]
    E = model.target_embedding
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    m = model.cfg.model
    posterior = families.get(m.family).denoiser_blocks and m.block != "paper"
    rows = []

    def record(step, block, sigma, logits):
        s = torch.full((len(w),), sigma, device=device)
        oracle_z = E[targets] + sigma * torch.randn(*targets.shape, E.shape[1], generator=g).to(device)
        _, oracle = model.blocks[block](context, oracle_z, s)
        row = {"step": step, "block": block, "sigma": sigma}
        scored = [("chain", logits.float()), ("noised_target", oracle.float())]
        if posterior:
            scored.append(("prior", model.blocks[block](context, oracle_z, s, with_evidence=False)[1].float()))
        for name, lg in scored:
            row[f"{name}_ce"] = F.cross_entropy(lg.transpose(1, 2), targets).item()
            row[f"{name}_accuracy"] = (lg.argmax(-1) == targets).float().mean().item()
        rows.append(row)

    model.teacher_forced_logits(w, seed=seed, temperature=0.0, on_step=record)
    return rows


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The ids a text prompt is generated from: the document separator seen in training (EOS for sentencepiece,
    the space for the character tokenizer, which has no EOS), then the text."""
    return [tokenizer.document_separator, *(int(i) for i in tokenizer.encode(prompt))]


def generate_texts(model, tokenizer, prompts: list[str], seed: int = 0, batch_size: int = 64, **kw) -> list[dict]:
    """Generate from text prompts (see prompt_ids), batch_size at a time, every prompt with `seed`."""
    ids = [prompt_ids(tokenizer, prompt) for prompt in prompts]
    outs = generate_batch(model, ids, seeds=[seed] * len(ids), eos_id=tokenizer.eos_id, batch_size=batch_size, **kw)
    results = []
    for prompt, p_ids, out in zip(prompts, ids, outs, strict=True):
        completion_ids = out[:-1] if out and out[-1] == tokenizer.eos_id else out
        # Decode prompt and completion together: sentencepiece drops the leading space of a lone first piece.
        completion = tokenizer.decode(p_ids + completion_ids)[len(tokenizer.decode(p_ids)) :]
        results.append({"prompt": prompt, "completion": completion, "new_tokens": len(out)})
    return results
