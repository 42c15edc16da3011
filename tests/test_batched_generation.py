"""Batched generation (dbscale.generate.generate_batch) is one-at-a-time generation, many sequences per pass:
the same tokens for every family's model and every chain sampler, whatever the batch size and the mix of
prompt lengths, with early stops at EOS."""

import pytest
import torch
from helpers import CFG, PROMPTS, V, huginn_cfg, llama_chain, normal_init, randomize

from dbscale.generate import generate_batch, generate_ids
from dbscale.models.huginn import HuginnDiffusionLM, HuginnLM
from dbscale.models.llama import LlamaLM, frozen_target_embedding

MODELS = {
    "llama": lambda: randomize(LlamaLM(CFG, V)),
    "chain mean/euler": lambda: llama_chain("mean", "euler"),
    "chain sample/ancestral": lambda: llama_chain("sample", "ancestral"),
    "huginn": lambda: normal_init(HuginnLM(huginn_cfg().model, V)).eval(),
    "huginn chain": lambda: normal_init(HuginnDiffusionLM(huginn_cfg(), V, frozen_target_embedding(V, 32, 0))).eval(),
}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_batched_generation_equals_one_at_a_time(name, temperature):
    torch.manual_seed(0)
    model = MODELS[name]()
    seeds = [11 * r + 3 for r in range(len(PROMPTS))]
    kw = dict(max_new_tokens=9, temperature=temperature, top_p=0.9)
    one = [generate_ids(model, p, seed=s, **kw) for p, s in zip(PROMPTS, seeds, strict=True)]
    assert all(len(o) == 9 for o in one)
    for batch_size in (2, 64):
        assert generate_batch(model, PROMPTS, seeds=seeds, batch_size=batch_size, **kw) == one
    # different seeds give different samples (the draws are per sequence, not shared by the batch); a random
    # mean/euler chain's last step is one-hot, so its picks do not move with the seed
    if temperature > 0 and name != "chain mean/euler":
        other = generate_batch(model, PROMPTS, seeds=[s + 1 for s in seeds], batch_size=64, **kw)
        assert other != one


def test_a_sequence_stops_at_eos_and_the_others_go_on():
    model = randomize(LlamaLM(CFG, V))
    seeds = list(range(len(PROMPTS)))
    full = generate_batch(model, PROMPTS, 9, temperature=1.0, seeds=seeds, batch_size=64)
    eos = full[0][3]  # the 4th token of sequence 0 is declared the end of text
    stopped = generate_batch(model, PROMPTS, 9, temperature=1.0, seeds=seeds, eos_id=eos, batch_size=64)
    for f, s in zip(full, stopped, strict=True):
        cut = f.index(eos) + 1 if eos in f else len(f)
        assert s == f[:cut]
    assert stopped[0] == full[0][: full[0].index(eos) + 1] and len(stopped[0]) <= 4
    assert stopped == [generate_ids(model, p, 9, 1.0, seed=s, eos_id=eos) for p, s in zip(PROMPTS, seeds, strict=True)]


def test_bad_batch_requests_are_refused():
    from dbscale.errors import GenerationError

    model = randomize(LlamaLM(CFG, V))
    with pytest.raises(GenerationError, match="batch size must be >= 1"):
        generate_batch(model, PROMPTS, 4, batch_size=0)
    with pytest.raises(GenerationError, match="2 seeds for 7 prompts"):
        generate_batch(model, PROMPTS, 4, seeds=[1, 2])
    with pytest.raises(GenerationError, match="exceeds the context"):
        generate_batch(model, [[1, 2], [1] * 20], 10)


def test_more_sampler_steps_than_blocks():
    """set_sample_steps(4) on B=2: two calls per block per token, each at a sigma inside its block's slice;
    generation stays the same cached, uncached and batched; None restores the default chain exactly."""
    model = llama_chain("mean", "euler")
    default = (list(model.sigmas), list(model.step_blocks))
    model.set_sample_steps(4)
    assert model.step_blocks == [0, 0, 1, 1] and len(model.sigmas) == 4
    d = model.cfg.diffusion
    assert model.sigmas[0] == d.sigma_max and model.sigmas[-1] == d.sigma_min
    assert all(a > b for a, b in zip(model.sigmas, model.sigmas[1:]))
    for sigma, b in zip(model.sigmas, model.step_blocks, strict=True):
        lo, hi = model.partition.intervals[b]
        assert lo * (1 - 1e-9) <= sigma <= hi * (1 + 1e-9)
    calls = []
    hooks = [blk.register_forward_hook(lambda m, i, o, b=b: calls.append(b)) for b, blk in enumerate(model.blocks)]
    seeds = [5 * r for r in range(len(PROMPTS))]
    kw = dict(max_new_tokens=3, temperature=1.0, top_p=0.9)
    one = [generate_ids(model, p, seed=s, use_cache=False, **kw) for p, s in zip(PROMPTS, seeds, strict=True)]
    for h in hooks:
        h.remove()
    assert calls[:4] == [0, 0, 1, 1] and len(calls) == 4 * 3 * len(PROMPTS)
    assert generate_batch(model, PROMPTS, seeds=seeds, batch_size=4, **kw) == one
    with pytest.raises(ValueError, match="1 sampler steps cannot visit all 2 blocks; use at least 2 steps"):
        model.set_sample_steps(1)
    assert len(model.sigmas) == len(model.step_blocks) == 4  # a refused request leaves the chain as it was
    model.set_sample_steps(None)
    assert (model.sigmas, model.step_blocks) == default
