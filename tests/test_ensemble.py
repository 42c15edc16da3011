"""The ensemble baseline (dbscale/models/ensemble.py): its log-probabilities against the members' by brute force,
and its cached generation against teacher-forced scoring."""

import math

import pytest
import torch
from helpers import randomize

from dbscale.config import ModelConfig
from dbscale.models.ensemble import EnsembleLM, combine
from dbscale.models.llama import LlamaLM

CFG = ModelConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, ffn_multiple_of=32, seq_len=16)
V = 37


def members(n: int = 3) -> list[LlamaLM]:
    return [randomize(LlamaLM(CFG, V).double(), seed=s) for s in range(n)]


def test_product_is_the_mean_of_the_members_log_probabilities_renormalised():
    lms = members()
    tokens = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(0))
    logps = torch.stack([torch.log_softmax(m(tokens), -1) for m in lms])
    ensemble = EnsembleLM(lms, "product").double()(tokens).double()
    offset = ensemble - logps.mean(0)  # the normaliser: the same for every token of a position
    torch.testing.assert_close(offset, offset[..., :1].expand_as(offset), rtol=0, atol=1e-5)
    torch.testing.assert_close(ensemble.exp().sum(-1), torch.ones(2, 9, dtype=ensemble.dtype), atol=1e-5, rtol=0)
    for b in range(2):  # by hand at one position: p(v) = prod_m p_m(v)^(1/M) / Z
        by_hand = torch.prod(logps[:, b, 4].exp() ** (1 / 3), dim=0)
        torch.testing.assert_close(ensemble[b, 4].exp(), by_hand / by_hand.sum(), atol=1e-6, rtol=1e-5)


def test_mixture_is_the_mean_of_the_members_probabilities():
    lms = members()
    tokens = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(1))
    probs = torch.stack([torch.softmax(m(tokens), -1) for m in lms]).mean(0)
    torch.testing.assert_close(EnsembleLM(lms, "mixture")(tokens).exp().double(), probs, atol=1e-6, rtol=1e-5)
    one = members(1)[0]  # an ensemble of one copy, either way, is the member
    for mode in ("product", "mixture"):
        got = EnsembleLM([one, one], mode)(tokens)
        torch.testing.assert_close(got.double(), torch.log_softmax(one(tokens), -1), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="choose one of product, mixture"):
        combine([one(tokens)], "average")
    assert math.isclose(float(combine([torch.zeros(4)] * 2, "mixture").exp().sum()), 1.0, rel_tol=1e-6)


@pytest.mark.parametrize("mode", ["product", "mixture"])
def test_cached_next_token_logits_equal_the_teacher_forced_rows(mode):
    ensemble = EnsembleLM(members(), mode)
    tokens = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(2))
    full = ensemble(tokens)
    cache = ensemble.new_cache()
    rows = [ensemble.next_token_logits(cache, tokens[:, :3])]
    rows += [ensemble.next_token_logits(cache, tokens[:, i : i + 1]) for i in range(3, 8)]
    for i, row in enumerate(rows):
        torch.testing.assert_close(row, full[:, i + 2], atol=1e-5, rtol=1e-5)
    assert ensemble.context_length == CFG.seq_len
