"""The Huginn family: truncated BPTT against a second implementation, memory that grows with k (baseline) and
does not exist for the diffusion core, cached generation, recurrence sampling, and a run through the tools."""

import json
import sys

import numpy as np
import pytest
import torch
import yaml
from helpers import huginn_cfg, normal_init
from helpers import run_cli as run

from dbscale.config import ConfigError
from dbscale.families import config_from_dict
from dbscale.generate import generate_ids
from dbscale.models.huginn import HuginnDenoiser, HuginnDiffusionLM, HuginnLM, causal_stack, sample_recurrence
from dbscale.models.llama import denoiser_loss, frozen_target_embedding
from dbscale.profiling import saved_activation_bytes

PY = sys.executable
V = 64


def reference_truncated_bptt(model, tokens, state, r, k):
    """Second implementation: run every iteration with a graph, detach the state before the last k."""
    cfg = model.cfg
    pos = torch.arange(tokens.shape[1])
    e = causal_stack(model.prelude, cfg, model.embed_tokens(tokens), pos)
    s = state
    for i in range(r):
        if i == r - k:
            s = s.detach()
        s = causal_stack(model.core, cfg, model.adapter(torch.cat([s, e], -1)), pos)
    return model.lm_head(model.norm(causal_stack(model.coda, cfg, s, pos)))


@pytest.mark.parametrize("r,k", [(5, 2), (3, 3), (2, 6)])
def test_truncated_bptt_gradients_match_a_detached_reference(r, k):
    model = normal_init(HuginnLM(huginn_cfg().model, V))
    tokens = torch.randint(0, V, (2, 12))
    state = torch.randn(2, 12, 32)
    model(tokens, iterations=r, bptt=k, state=state).square().mean().backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    reference_truncated_bptt(model, tokens, state, r, min(k, r)).square().mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, msg=n)
    if k < r:  # the prelude still learns through the adapter of the last k iterations
        assert ours["prelude.0.self_attn.q_proj.weight"].abs().sum() > 0


def test_baseline_activation_memory_grows_with_k_and_the_diffusion_core_has_no_recurrence():
    cfg = huginn_cfg()
    model = normal_init(HuginnLM(cfg.model, V))
    tokens = torch.randint(0, V, (2, 16))
    held = list(model.parameters())
    saved = {}
    for k in (1, 2, 4):
        saved[k] = saved_activation_bytes(lambda k=k: model(tokens, iterations=4, bptt=k).sum(), held)["bytes"]
    per_iteration = saved[2] - saved[1]
    assert per_iteration > 0 and saved[4] - saved[2] == pytest.approx(2 * per_iteration, rel=0.01)
    table = frozen_target_embedding(V, 32, 0)
    block = HuginnDenoiser(cfg.model, V, 0.5, table)
    window = torch.randint(0, V, (2, 17))

    def step():
        return denoiser_loss(block, window, table, torch.ones(2), torch.randn(2, 16, 32), "edm", 0.5)[0]

    one_pass = saved_activation_bytes(step, list(block.parameters()))["bytes"]
    assert 0 < one_pass < saved[4]  # one pass of 6 layers over 2T positions < 4 iterations of the core


def test_cached_generation_equals_uncached_for_baseline_and_diffusion_core():
    cfg = huginn_cfg()
    baseline = normal_init(HuginnLM(cfg.model, V)).eval()
    chain = normal_init(HuginnDiffusionLM(cfg, V, frozen_target_embedding(V, 32, 0))).eval()
    for model in (baseline, chain):
        a = generate_ids(model, [1, 2, 3], 8, use_cache=True, seed=4)
        b = generate_ids(model, [1, 2, 3], 8, use_cache=False, seed=4)
        assert a == b and len(a) == 8
    assert len(chain.sigmas) == 6  # K = diffusion.sample_steps Euler steps per token


def test_recurrence_sampling_has_the_configured_mean():
    rng = np.random.default_rng(0)
    draws = np.array([sample_recurrence(rng, 32, 0.5) for _ in range(20000)])
    assert draws.min() >= 1 and draws.mean() == pytest.approx(33, rel=0.02)


def test_huginn_config_errors():
    with pytest.raises(ConfigError, match="model.n_layers: a Huginn model is prelude \\+ core \\+ coda"):
        huginn_cfg(n_layers=6)
    with pytest.raises(ConfigError, match=r"model\.huginn\.bptt_steps"):
        huginn_cfg(bptt_steps=0)
    with pytest.raises(ConfigError, match="diffusion.sample_steps"):
        config_from_dict(
            {
                "model": {"family": "huginn", "n_layers": 8, "d_model": 32, "n_heads": 2},
                "diffusion": {"num_blocks": 2, "sample_steps": 1},
            }
        )


@pytest.mark.slow
def test_huginn_run_trains_both_merges_generates_and_refuses_the_wrong_family(tmp_path, speeches):
    from dbscale.errors import RunError
    from dbscale.merge import load_merged

    cfg = {
        "name": "huginn-test",
        "model": {
            "family": "huginn",
            "n_layers": 8,
            "d_model": 32,
            "n_heads": 2,
            "ffn_multiple_of": 32,
            "seq_len": 32,
            "huginn": {"mean_recurrence": 3, "bptt_steps": 2},
        },
        "diffusion": {"num_blocks": 2, "sample_steps": 4},
        "data": {
            "source": "files",
            "paths": [str(p) for p in speeches[:8]],
            "vocab_size": 512,
            "val_fraction": 0.2,
            "tokenizer_train_chars": 300000,
        },
        "train": {
            "steps": 3,
            "micro_batch": 4,
            "lr": 1e-3,
            "warmup_steps": 1,
            "log_every": 1,
            "val_every": 3,
            "val_batches": 2,
            "save_every": 3,
        },
    }
    path = tmp_path / "h.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = tmp_path / "run"
    run([PY, "tools/prepare.py", "--config", str(path), "--run", str(r)])
    for b in range(2):
        run([PY, "launchers/train_block.py", "--run", str(r), "--block", str(b)])
    run([PY, "launchers/train_e2e.py", "--run", str(r)])
    run([PY, "tools/merge_blocks.py", "--run", str(r)])
    run([PY, "tools/merge_blocks.py", "--run", str(r), "--e2e"])
    for model in ("merged", "e2e/merged"):
        out = run(
            [
                PY,
                "tools/generate.py",
                "--model",
                str(r / model),
                "--prompt",
                "The",
                "--max-new-tokens",
                "5",
                "--format",
                "jsonl",
                "--heldout",
                str(r),
                "--heldout-windows",
                "4",
            ]
        )
        lines = [json.loads(line) for line in out.stdout.splitlines()]
        ce = lines[1]["ce"] if model == "e2e/merged" else lines[1]["first_step_ce"]  # a chain's last step: one-hot
        assert lines[0]["new_tokens"] == 5 and 0 < ce < 10 and 0 <= lines[1]["sample_accuracy"] <= 1
    model, _, manifest = load_merged(r / "merged", family="huginn")
    assert isinstance(model, HuginnDiffusionLM) and model.step_blocks == [0, 0, 1, 1]
    with pytest.raises(RunError, match="a merged 'huginn' model, but a 'llama' model is needed"):
        load_merged(r / "merged", family="llama")
