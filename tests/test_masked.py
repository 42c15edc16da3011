"""The masked family: schedules, t-partition, ELBO (against an exact enumeration), SUBS, the sampler,
the character tokenizer and text8 data, and a run through the real entry points."""

import itertools
import json
import math
import sys

import numpy as np
import pytest
import torch
import yaml
from helpers import run_cli as run
from scipy import integrate

from dbscale.config import ConfigError
from dbscale.data.sources import load_split_documents, text8_normalize, text8_split
from dbscale.data.tokenizer import CharTokenizer
from dbscale.diffusion.masking import MaskSchedule, TPartition, sample_steps, stratified_times
from dbscale.errors import DataError, GenerationError
from dbscale.eval.likelihood import known_from_text, masked_bpc, masked_generate
from dbscale.families import config_from_dict
from dbscale.models.masked import MaskedDenoiser, MaskedDiffusionLM, masked_elbo_terms

PY = sys.executable
ALPHABET = " abcdefghijklmnopqrstuvwxyz"


def masked_cfg(**sections):
    cfg = {
        "model": {"family": "masked", "n_layers": 3, "d_model": 32, "n_heads": 2, "ffn_multiple_of": 32, "seq_len": 16},
        "diffusion": {"num_blocks": 3},
        "data": {"tokenizer_type": "char", "vocab_size": 27, "normalize": "text8"},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return config_from_dict(cfg)


def flat(pairs):
    return [x for pair in pairs for x in pair]


# --- schedules and the partition ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "loglinear", "cosine"])
def test_schedule_inverse_and_weight_against_finite_differences(kind):
    s = MaskSchedule(kind, eps=1e-3)
    assert s.alpha(0.0) == pytest.approx(1.0) and s.alpha(1.0) == pytest.approx(s.alpha_min, abs=1e-12)
    for t in np.linspace(0.02, 0.98, 25):
        assert s.t_of_alpha(s.alpha(t)) == pytest.approx(t, abs=1e-9)
        assert s.t_of_u(s.u_of_t(t)) == pytest.approx(t, abs=1e-9)
        h = 1e-6
        derivative = (s.alpha(t + h) - s.alpha(t - h)) / (2 * h)
        assert s.weight(t) == pytest.approx(-derivative / (1 - s.alpha(t)), rel=1e-5)


def test_partition_b3_linear_is_thirds_with_block0_most_masked():
    p = TPartition.build(3, MaskSchedule("linear"), gamma=0.0)
    assert p.boundaries == pytest.approx((0, 1 / 3, 2 / 3, 1))
    assert flat(p.intervals) == pytest.approx([2 / 3, 1, 1 / 3, 2 / 3, 0, 1 / 3])
    widened = TPartition.build(3, MaskSchedule("linear"), gamma=0.1).train_intervals
    assert flat(widened) == pytest.approx([2 / 3 - 1 / 30, 1, 1 / 3 - 1 / 30, 2 / 3 + 1 / 30, 0, 1 / 3 + 1 / 30])


def test_cosine_partition_has_equal_alpha_decrements_and_gamma_in_alpha_space():
    s = MaskSchedule("cosine")
    p = TPartition.build(4, s, gamma=0.2)
    assert [s.alpha(t) for t in p.boundaries] == pytest.approx([1, 0.75, 0.5, 0.25, 0])
    lo, hi = p.train_intervals[1]  # alpha slice [0.25, 0.5] widened by 0.2 * 0.25 on each side
    assert (s.alpha(hi), s.alpha(lo)) == pytest.approx((0.2, 0.55))


@pytest.mark.parametrize("steps", [3, 5, 8, 17])
def test_explicit_t_boundaries_route_steps_inside_their_slices(steps):
    bounds = [0.0, 0.1, 0.45, 1.0]
    p = TPartition.build(3, MaskSchedule("linear"), 0.0, bounds)
    assert flat(p.intervals) == pytest.approx([0.45, 1.0, 0.1, 0.45, 0.0, 0.1])
    times, blocks = sample_steps(steps, 3, MaskSchedule("linear"), bounds)
    assert sorted(set(blocks)) == [0, 1, 2]
    for k, b in enumerate(blocks):
        lo, hi = p.intervals[b]
        assert lo - 1e-12 <= times[k] <= hi + 1e-12
    with pytest.raises(ConfigError, match="diffusion.t_boundaries"):
        masked_cfg(diffusion={"t_boundaries": [0.0, 0.5, 0.5, 1.0]})
    assert masked_cfg(diffusion={"t_boundaries": bounds}).diffusion.t_boundaries == bounds


def test_a_block_with_an_empty_interval_is_refused():
    class Collapsed(MaskSchedule):  # a schedule whose inverse collapses the middle: block 1 gets nothing
        def t_of_u(self, u):
            return 0.5

    with pytest.raises(ValueError, match="block 1 gets an empty t-interval"):
        TPartition.build(3, Collapsed("linear"), gamma=0.0)


def test_stratified_times_put_one_time_in_each_stratum():
    g = torch.Generator().manual_seed(0)
    t = stratified_times(8, 0.25, 0.75, generator=g)
    strata = torch.floor((t.double() - 0.25) / 0.5 * 8).long()
    assert sorted(strata.tolist()) == list(range(8))


@pytest.mark.parametrize("steps", [3, 4, 5, 7, 16, 31])
def test_sampler_steps_visit_every_block_in_order_inside_its_slice(steps):
    s = MaskSchedule("cosine")
    p = TPartition.build(3, s, gamma=0.0)
    times, blocks = sample_steps(steps, 3, s)
    assert times[0] == 1.0 and times[-1] == 0.0 and len(blocks) == steps
    assert sorted(set(blocks)) == [0, 1, 2] and blocks == sorted(blocks)
    for k, b in enumerate(blocks):
        lo, hi = p.intervals[b]
        assert lo - 1e-12 <= times[k] <= hi + 1e-12
    assert sample_steps(3, 3, s)[1] == [0, 1, 2]
    with pytest.raises(ValueError, match="cannot visit all 3 blocks"):
        sample_steps(2, 3, s)


# --- the ELBO ----------------------------------------------------------------------------------------------
def uniform_model(cfg, e2e=False):
    model = MaskedDiffusionLM(cfg, 27, e2e=e2e)
    for block in model.blocks:
        torch.nn.init.zeros_(block.lm_head.weight)  # logits 0: uniform over the 27 symbols
    return model.eval()


@pytest.mark.parametrize("e2e", [False, True])
def test_a_uniform_model_scores_log2_27_bits_per_character(e2e):
    # Exact in expectation (the clamp at t_min changes nothing for a model that ignores its input).
    cfg = masked_cfg(model={"seq_len": 64})
    windows = np.random.default_rng(0).integers(0, 27, size=(128, 64))
    result = masked_bpc(uniform_model(cfg, e2e), windows, num_t=8, seed=1, batch_size=64)
    assert 0 < result["stderr"] < 0.1
    assert abs(result["bits_per_token"] - math.log2(27)) < 4 * result["stderr"]


def exact_nelbo(block, x0, schedule, t_min):
    """The slice [0, 1] NELBO of one sequence by brute force: every mask pattern M, each weighted by
    P(M | t) = (1-alpha)^|M| alpha^(T-|M|), the model's CE at the masked positions, integrated over t by
    quadrature (with the same clamp at t_min). The model must not depend on t."""
    T = len(x0)
    losses = {}
    for pattern in itertools.product([0, 1], repeat=T):
        m = torch.tensor(pattern, dtype=torch.bool)
        if not m.any():
            continue
        xt = torch.where(m, torch.tensor(27), torch.tensor(x0))[None]
        ce = torch.nn.functional.cross_entropy(
            block(xt, torch.zeros(1))[0].double(), torch.tensor(x0), reduction="none"
        )
        losses[pattern] = (ce * m).sum().item()

    def integrand(t):
        t = max(t, t_min)
        a = schedule.alpha(t)
        total = sum((1 - a) ** sum(p) * a ** (T - sum(p)) * loss for p, loss in losses.items())
        return schedule.weight(t) * total / T

    return integrate.quad(integrand, 0, 1, points=[t_min], limit=200)[0]


def test_elbo_estimate_matches_exact_enumeration():
    cfg = masked_cfg(model={"time_conditioning": False, "seq_len": 4, "n_layers": 2}, diffusion={"num_blocks": 2})
    torch.manual_seed(0)
    model = MaskedDiffusionLM(cfg, 27).eval()
    model.blocks[1].load_state_dict(model.blocks[0].state_dict())  # one denoiser: the blocks' sum is its NELBO
    x0 = [3, 0, 17, 9]
    exact = exact_nelbo(model.blocks[0], x0, model.schedule, cfg.diffusion.t_min)
    windows = torch.tensor([x0] * 4000)
    per_window = model.nelbo_per_window(windows, num_t=4, seed=0).numpy()
    mean, se = per_window.mean(), per_window.std() / math.sqrt(len(per_window))
    assert abs(mean - exact) < 4 * se and se < 0.02 * exact


def test_a_block_slice_term_is_its_share_of_the_integral():
    # With a uniform model every slice contributes (width) * ln 27 per character in expectation.
    cfg = masked_cfg()
    block = uniform_model(cfg).blocks[0]
    window = torch.from_numpy(np.random.default_rng(1).integers(0, 27, size=(4000, 16)))
    g = torch.Generator().manual_seed(0)
    t = stratified_times(4000, 0.5, 0.75, generator=g)
    nelbo, masked_ce = masked_elbo_terms(
        block, window, t, torch.rand(window.shape, generator=g), MaskSchedule(), 0.25, 1e-3, 27
    )
    assert nelbo.mean().item() == pytest.approx(0.25 * math.log(27), rel=0.02)
    assert masked_ce.mean().item() == pytest.approx(math.log(27), rel=1e-5)


# --- the model ---------------------------------------------------------------------------------------------
def test_subs_never_predicts_the_mask_and_attention_is_bidirectional():
    cfg = masked_cfg()
    torch.manual_seed(0)
    m = MaskedDenoiser(cfg.model, 27, 2)
    for p in m.parameters():  # leave the zero-inits: normal_init everything so the layers do something
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randint(0, 28, (1, 16))
    logits = m(x, torch.tensor([0.5]))
    assert logits.shape == (1, 16, 27)  # no logit for the mask id 27
    y = x.clone()
    y[0, -1] = (x[0, -1] + 1) % 27
    assert not torch.allclose(m(y, torch.tensor([0.5]))[0, 0], logits[0, 0])  # position 0 sees the last one
    assert not torch.allclose(m(x, torch.tensor([0.1]))[0, 0], logits[0, 0])  # and depends on t


def test_sampler_routes_each_step_to_its_block_and_keeps_known_tokens():
    cfg = masked_cfg()
    torch.manual_seed(0)
    model = MaskedDiffusionLM(cfg, 27).eval()
    seen = {b: [] for b in range(3)}
    for b, block in enumerate(model.blocks):
        block.register_forward_hook(lambda mod, args, out, b=b: seen[b].append(float(args[1][0])))
    known = torch.full((2, 16), -1)
    known[:, 3:6] = torch.tensor([1, 2, 3])
    x = model.sample(2, 16, steps=9, seed=0, known=known)
    assert (x < 27).all() and (x[:, 3:6] == torch.tensor([1, 2, 3])).all()
    for b, ts in seen.items():
        lo, hi = model.intervals[b]
        assert len(ts) == 3 and all(lo - 1e-6 <= t <= hi + 1e-6 for t in ts)  # (t passes through fp32)


def test_cached_sampler_equals_uncached_and_saves_calls_and_is_refused_when_invalid():
    cfg = masked_cfg(model={"time_conditioning": False})
    torch.manual_seed(0)
    model = MaskedDiffusionLM(cfg, 27).eval()
    plain = model.sample(2, 16, steps=64, seed=3)
    calls = model.model_calls
    cached = model.sample(2, 16, steps=64, seed=3, use_cache=True)
    assert torch.equal(plain, cached) and model.model_calls - calls < calls
    timed = MaskedDiffusionLM(masked_cfg(), 27).eval()
    with pytest.raises(ValueError, match="time_conditioning: false"):
        timed.sample(1, 16, steps=8, use_cache=True)


def test_generation_input_errors():
    cfg = masked_cfg()
    model = MaskedDiffusionLM(cfg, 27).eval()
    tok = CharTokenizer(ALPHABET)
    with pytest.raises(GenerationError, match="cannot visit all 3 blocks"):
        masked_generate(model, tok, steps=2)
    with pytest.raises(GenerationError, match="longer than the 16"):
        masked_generate(model, tok, prompt="x" * 17, steps=3)
    with pytest.raises(GenerationError, match="no '_'"):
        known_from_text(tok, 16, template="abc")
    assert known_from_text(tok, 8, template="a_b").tolist() == [1, -1, 2, -1, -1, -1, -1, -1]
    out = masked_generate(model, tok, prompt="the ", steps=3, num_samples=2)
    assert all(r["text"].startswith("the ") and len(r["text"]) == 16 for r in out)


# --- characters and text8 ----------------------------------------------------------------------------------
def test_text8_normalisation_and_char_tokenizer():
    assert text8_normalize("Hello, World -- in 1942!\n") == "hello world in one nine four two"
    tok = CharTokenizer(ALPHABET)
    ids = tok.encode("the union")
    assert tok.decode(ids) == "the union" and tok.vocab_size == 27 and ids[0] == 20
    assert tok.out_of_vocab(["Hi there!", "ok."]) == {"H": 1, "!": 1, ".": 1}
    with pytest.raises(DataError, match="'H' is not in the alphabet"):
        tok.encode("Hi")


def test_text8_loader_splits_a_local_file_by_position(tmp_path):
    from dbscale.config import DataConfig

    text = "".join(ALPHABET[i % 27] for i in range(20000))
    (tmp_path / "text8").write_text(text)
    train, val = load_split_documents(DataConfig(source="text8", hf_data_files=[str(tmp_path / "text8")]))
    assert train == [text[:18000]] and val == [text[18000:19000]]
    assert [len(p) for p in text8_split("x" * 100_000_000)] == [90_000_000, 5_000_000, 5_000_000]


def test_out_of_vocabulary_characters_are_refused_or_mapped(tmp_path):
    from dbscale.create_run import prepare_run

    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(4):
        (docs / f"{i}.txt").write_text("the state of the union is strong, said the President. " * 40)
    base = {
        "model": {"family": "masked", "n_layers": 3, "d_model": 32, "n_heads": 2, "seq_len": 16},
        "diffusion": {"num_blocks": 3},
        "data": {
            "source": "files",
            "paths": [str(docs)],
            "tokenizer_type": "char",
            "vocab_size": 27,
            "val_fraction": 0.25,
        },
    }
    with pytest.raises(DataError, match=r"480 characters of 3 kinds outside the alphabet: ',' x160, 'P' x160") as e:
        prepare_run(config_from_dict(base), tmp_path / "refused", log=lambda m: None)
    assert "data.out_of_vocab: map" in str(e.value) and list(tmp_path.iterdir()) == [docs]  # no run, no staging
    base["data"]["out_of_vocab"] = "map"
    logs = []
    run_ = prepare_run(config_from_dict(base), tmp_path / "mapped", log=logs.append)
    assert any("mapped 480 characters of 3 kinds" in m for m in logs)
    assert run_.tokenizer().decode(run_.shards("train").arrays[0][:20]) == "the state of the uni"
    assert not (tmp_path / "mapped" / "target_embedding.safetensors").exists()


def test_masked_config_errors():
    with pytest.raises(ConfigError, match="data.vocab_size: the 'char' tokenizer has one id per character"):
        masked_cfg(data={"vocab_size": 32})
    with pytest.raises(ConfigError, match="diffusion.partition"):
        masked_cfg(diffusion={"partition": "uniform"})
    with pytest.raises(ConfigError, match="diffusion.sample_steps"):
        masked_cfg(diffusion={"sample_steps": 2})


# --- a run through the real entry points -------------------------------------------------------------------
@pytest.mark.slow
def test_masked_run_trains_merges_samples_and_scores(tmp_path, speeches):
    cfg = {
        "name": "mdm-test",
        "model": {"family": "masked", "n_layers": 3, "d_model": 32, "n_heads": 2, "ffn_multiple_of": 32, "seq_len": 32},
        "diffusion": {"num_blocks": 3},
        "data": {
            "source": "files",
            "paths": [str(p) for p in speeches[:6]],
            "normalize": "text8",
            "tokenizer_type": "char",
            "vocab_size": 27,
            "val_fraction": 0.2,
        },
        "train": {
            "steps": 4,
            "micro_batch": 4,
            "lr": 1e-3,
            "warmup_steps": 1,
            "log_every": 1,
            "val_every": 4,
            "val_batches": 2,
            "save_every": 4,
        },
    }
    path = tmp_path / "mdm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = tmp_path / "run"
    dry = json.loads(run([PY, "tools/prepare.py", "--config", str(path), "--dry-run"]).stdout)
    assert flat(dry["partition"]["block_intervals"]) == pytest.approx([2 / 3, 1, 1 / 3, 2 / 3, 0, 1 / 3])
    run([PY, "tools/prepare.py", "--config", str(path), "--run", str(r)])
    for b in range(3):
        run([PY, "launchers/train_block.py", "--run", str(r), "--block", str(b)])
    run([PY, "launchers/train_e2e.py", "--run", str(r)])
    run([PY, "tools/merge_blocks.py", "--run", str(r)])
    run([PY, "tools/merge_blocks.py", "--run", str(r), "--e2e"])
    scores = {}
    for model in ("merged", "e2e/merged"):
        out = run(
            [
                PY,
                "tools/generate.py",
                "--model",
                str(r / model),
                "--prompt",
                "the",
                "--infill",
                "a__b",
                "--steps",
                "6",
                "--format",
                "jsonl",
                "--bpc",
                str(r),
                "--bpc-windows",
                "8",
                "--t-samples",
                "2",
            ]
        )
        lines = [json.loads(line) for line in out.stdout.splitlines()]
        texts = [line["text"] for line in lines if "text" in line]
        assert texts[0].startswith("the") and texts[1][0] == "a" and texts[1][3] == "b"
        assert all(len(t) == 32 and set(t) <= set(ALPHABET) for t in texts)
        scores[model] = next(line for line in lines if "bpc" in line)
    assert scores["merged"]["blocks"] == 3 and scores["e2e/merged"]["blocks"] == 1
    for s in scores.values():  # 4 steps: still close to the uniform model's 4.755 bits (a noisy 8-window estimate)
        assert s["stderr"] > 0 and abs(s["bpc"] - math.log2(27)) < max(1.0, 4 * s["stderr"])
    p = run([PY, "tools/generate.py", "--model", str(r / "merged"), "--steps", "2"], expect=2)
    assert "cannot visit all 3 blocks" in p.stderr and "Traceback" not in p.stderr
