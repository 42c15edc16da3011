"""Evaluation and reports: MAUVE and featurizer sanity, judge perplexity against a second implementation,
the whole protocol on a tiny run (with --compare), and the report's files."""

import json

import numpy as np
import pytest
import torch

from dbscale.config import ModelConfig
from dbscale.errors import DbscaleError
from dbscale.eval.features import Featurizer, FeaturizerError, mauve_score
from dbscale.eval.protocol import EvalSettings, distinct_ngrams, evaluate, format_table, judge_perplexity
from dbscale.models.llama import LlamaLM


def test_mauve_separates_distributions():
    rng = np.random.default_rng(0)
    p = rng.normal(size=(300, 16)).astype(np.float32)
    same = rng.normal(size=(300, 16)).astype(np.float32)
    shifted = (rng.normal(size=(300, 16)) + 1.0).astype(np.float32)
    assert mauve_score(p, same)["mauve"] > 0.9
    assert mauve_score(p, shifted)["mauve"] < 0.1


def test_minilm_featurizer_is_offline_and_meaningful():
    f = Featurizer("minilm")
    emb = f(["The cat sat on the mat.", "A cat was sitting on the mat.", "Stock markets fell sharply today."])
    assert emb.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    assert emb[0] @ emb[1] > 0.6 > emb[0] @ emb[2]
    assert f.label == "MAUVE (MiniLM features)"


def test_featurizer_errors_name_the_alternative():
    with pytest.raises(FeaturizerError, match="--featurizer minilm"):
        Featurizer("gpt2-large")  # the hub is unreachable here (HF_HUB_OFFLINE=1)
    with pytest.raises(FeaturizerError, match="unknown featurizer"):
        Featurizer("bert")


def test_judge_perplexity_matches_a_direct_computation():
    torch.manual_seed(0)
    judge = LlamaLM(ModelConfig(n_layers=1, d_model=32, n_heads=2, seq_len=32, ffn_multiple_of=32), 50).eval()
    prompts = np.random.default_rng(1).integers(0, 50, size=(3, 5))
    conts = np.random.default_rng(2).integers(0, 50, size=(6, 4))  # 2 samples per prompt
    total, count = 0.0, 0
    for i, cont in enumerate(conts):
        seq = torch.tensor(np.concatenate([prompts[i // 2], cont]))
        with torch.no_grad():
            logp = torch.log_softmax(judge(seq[None])[0].float(), -1)
        for j in range(5, 9):  # token j predicted from position j-1
            total -= logp[j - 1, seq[j]].item()
            count += 1
    assert judge_perplexity(judge, prompts, conts, batch_size=4) == pytest.approx(np.exp(total / count), rel=1e-5)


def test_distinct_ngrams_golden():
    assert distinct_ngrams(np.array([[1, 2, 3, 1, 2, 3]]), 2) == pytest.approx(3 / 5)
    assert distinct_ngrams(np.array([[1, 2, 3, 4]]), 4) == 1.0


@pytest.fixture(scope="module")
def trained_run(process_group, tmp_path_factory, speeches):
    from helpers import tiny_config_dict

    from dbscale.create_run import prepare_run
    from dbscale.families import config_from_dict
    from dbscale.merge import merge_run
    from dbscale.train.trainer import Trainer

    cfg = config_from_dict(tiny_config_dict([str(p) for p in speeches[:12]], train={"steps": 4, "val_every": 2}))
    run = prepare_run(cfg, tmp_path_factory.mktemp("eval") / "run", log=lambda *a: None)
    for job in (0, 1, None):
        Trainer(run, job, 0, 1).train()
    merge_run(run.root, log=lambda *a: None)
    merge_run(run.root, e2e=True, log=lambda *a: None)
    return run


def test_protocol_compares_two_models_on_the_same_prompts(trained_run):
    s = EvalSettings(num_prompts=6, samples_per_prompt=2, prompt_tokens=8, new_tokens=6, heldout_windows=4)
    report = evaluate(
        [trained_run.root / "merged", (trained_run.root / "e2e/merged", {"steps": 2})],
        trained_run.root,
        s,
        log=lambda *a: None,
    )
    blocks, e2e = report["results"]
    assert (blocks["label"], e2e["label"]) == ("DiffusionBlocks", "end-to-end")
    assert [x["prompt"] for x in blocks["samples"]] == [x["prompt"] for x in e2e["samples"]]
    assert blocks["reference_perplexity"] == e2e["reference_perplexity"]  # same references, same judge
    for r in report["results"]:
        assert 0 <= r["mauve"]["mauve"] <= 1 and r["mauve"]["label"] == "MAUVE (MiniLM features)"
        assert r["mauve"]["num_reference"] == 6 and r["mauve"]["num_generated"] == 12
        assert r["generative_perplexity"] > 1 and r["heldout"]["tokens"] == 4 * 32
    assert report["settings"]["new_tokens"] == 6 and "dbscale end-to-end baseline" in report["judge"]
    assert "MAUVE (MiniLM features)" in format_table(report)
    assert "DiffusionBlocks (mean, euler, 4 steps)" in format_table(report)
    assert blocks["sampler"] == {"estimate": "mean", "step": "euler", "steps": 4}  # B=2: 4 steps by default
    assert e2e["sampler"] is None
    with pytest.raises(DbscaleError, match="1 sampler steps cannot visit all 2 blocks"):
        evaluate([(trained_run.root / "merged", {"steps": 1})], trained_run.root, s, log=lambda *a: None)
    with pytest.raises(DbscaleError, match="exceed the context"):
        evaluate([trained_run.root / "merged"], trained_run.root, EvalSettings(prompt_tokens=30, new_tokens=10))


def test_an_ensemble_of_copies_evaluates_as_its_member(trained_run):
    """`evaluate --ensemble`: two copies of the baseline, either mode, sample the baseline's tokens and score its
    held-out CE (the same prompts and seeds); a chain as a member is refused."""
    from dbscale.eval.protocol import Ensemble

    e2e = str(trained_run.root / "e2e/merged")
    s = EvalSettings(num_prompts=5, samples_per_prompt=2, prompt_tokens=8, new_tokens=5, heldout_windows=3)
    report = evaluate([e2e, Ensemble((e2e, e2e), "mixture")], trained_run.root, s, log=lambda *a: None)
    alone, ensemble = report["results"]
    assert ensemble["label"] == "ensemble of 2 (mixture)" and ensemble["model"] == f"{e2e},{e2e}"
    assert [x["continuation"] for x in ensemble["samples"]] == [x["continuation"] for x in alone["samples"]]
    assert ensemble["heldout"]["ce"] == pytest.approx(alone["heldout"]["ce"], rel=1e-5)
    with pytest.raises(DbscaleError, match="an ensemble is made of plain LMs"):
        evaluate([Ensemble((e2e, str(trained_run.root / "merged")))], trained_run.root, s, log=lambda *a: None)


def test_report_writes_figures_and_page(trained_run, tmp_path):
    from dbscale.report import write_report

    s = EvalSettings(num_prompts=5, samples_per_prompt=2, prompt_tokens=8, new_tokens=4, heldout_windows=2)
    evaluation = evaluate([trained_run.root / "e2e/merged"], trained_run.root, s, log=lambda *a: None)
    (tmp_path / "eval.json").write_text(json.dumps(evaluation))
    out = write_report(trained_run.root, tmp_path / "eval.json")
    page = (out / "index.html").read_text()
    for name in ("partition.png", "losses.png", "throughput.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000 and name in page
    assert (
        "block 1" in page
        and "MAUVE (MiniLM features)" in page
        and evaluation["results"][0]["samples"][0]["prompt"][:10] in page
    )
    assert not list(trained_run.root.glob(".report-*"))
