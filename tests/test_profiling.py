"""The bench's memory accounting against hand-counted cases."""

import torch

from dbscale.profiling import saved_activation_bytes, state_bytes, tensor_bytes


def test_saved_bytes_count_activations_once_and_skip_parameters():
    w = torch.nn.Parameter(torch.randn(8, 16))
    x = torch.randn(4, 8)

    def forward():
        h = x @ w  # saves x (4x8) and w (a parameter: skipped)
        return (h.exp() * h).sum()  # exp saves its output (4x16); mul saves h and exp(h)

    got = saved_activation_bytes(forward, [w])
    assert got["bytes"] == 4 * (4 * 8 + 4 * 16 + 4 * 16)  # x, h, exp(h): each storage once
    assert got["largest"] == 4 * 4 * 16 and got["count"] == 3


def test_views_of_one_tensor_are_one_storage():
    assert tensor_bytes([t := torch.zeros(10, 10), t[:5], t.view(100)]) == 400


def test_state_bytes_after_an_adamw_step():
    model = torch.nn.Linear(10, 3)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 10)).sum().backward()
    opt.step()
    s = state_bytes(model, opt)
    assert s["parameters"] == s["gradients"] == 4 * 33
    assert s["optimizer"] == 2 * 4 * 33 + 2 * 4  # two moments per parameter + one step counter per tensor


def test_bench_results_record_how_to_produce_them(tmp_path, monkeypatch):
    """Every bench JSON starts with the command that wrote it, and says on what machine."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_common", Path(__file__).parents[1] / "bench/common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(sys, "argv", ["bench/generate.py", "--quick", "--batch-sizes", "1,64"])
    data = json.loads(common.write_results("x.json", {"rows": [1]}).read_text())
    assert data["command"] == "python bench/generate.py --quick --batch-sizes 1,64"
    assert list(data)[0] == "command" and data["rows"] == [1] and data["device_info"]["torch"] == torch.__version__


def test_generation_profile_gives_each_part_its_own_calls(monkeypatch):
    """bench/generate.py --profile: with a clock that ticks once per reading, each part's seconds are its number
    of calls (hooks around every layer and head, the chain's clean estimates), 'rest' is the remainder, and the
    hooks and the estimate's wrapper are gone afterwards."""
    import importlib.util
    import itertools
    import types
    from pathlib import Path

    from helpers import PROMPTS, llama_chain

    import dbscale.models.llama as llama
    from dbscale.generate import generate_batch
    from dbscale.models.layers import Head, TransformerLayer

    path = Path(__file__).parents[1] / "bench/generate.py"
    spec = importlib.util.spec_from_file_location("bench_generate", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ticks = itertools.count()
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))

    model = llama_chain("mean", "euler")
    calls = {"layers": 0, "head": 0, "estimate": 0}

    def count(name):
        def hook(*_):
            calls[name] += 1

        return hook

    for m in model.modules():
        if isinstance(m, TransformerLayer | Head):
            m.register_forward_hook(count("layers" if isinstance(m, TransformerLayer) else "head"))
    estimate = llama.clean_estimate

    def counted_estimate(*a, **kw):
        calls["estimate"] += 1
        return estimate(*a, **kw)

    monkeypatch.setattr(llama, "clean_estimate", counted_estimate)
    new_tokens = 5
    with bench.timed_parts(model, "cpu") as parts:
        generate_batch(model, PROMPTS[:3], new_tokens, temperature=0.0, batch_size=3)
    assert llama.clean_estimate is counted_estimate  # the bench's wrapper is removed again
    assert min(calls.values()) > 0
    assert {k: parts[k] for k in calls} == calls
    # Every timed call read the clock twice, plus one reading at the start and one at the end.
    assert parts["rest"] == sum(calls.values()) + 1
    counted, after = dict(calls), next(ticks)
    generate_batch(model, PROMPTS[:3], new_tokens, temperature=0.0, batch_size=3)
    assert calls["layers"] > counted["layers"] and next(ticks) == after + 1  # no hook of the bench's reads the clock


def test_flops_of_products_and_attention_against_their_formulas():
    """A linear layer forward and backward: three (m x k) by (k x n) products at 2 FLOPs per multiply-add. CPU
    attention, which torch does not count itself: the same as the explicit products (scores, weighted values)
    forward, and backward those four gradient products plus the recomputed scores, as torch counts its
    CUDA kernels."""
    import torch.nn.functional as F

    from dbscale.profiling import count_flops

    m, k, n = 5, 7, 3
    x = torch.randn(m, k, requires_grad=True)
    layer = torch.nn.Linear(k, n, bias=False)
    assert count_flops(lambda: layer(x).sum().backward()) == 3 * 2 * m * k * n
    with torch.no_grad():
        assert count_flops(lambda: layer(x)) == 2 * m * k * n

    b, h, t, d = 2, 3, 16, 8
    q, key, v = (torch.randn(b, h, t, d, requires_grad=True) for _ in range(3))
    mask = torch.ones(t, t, dtype=torch.bool).tril()

    def fused():
        F.scaled_dot_product_attention(q, key, v, attn_mask=mask).sum().backward()

    def explicit():
        scores = (q @ key.transpose(-1, -2) / d**0.5).masked_fill(~mask, float("-inf"))
        (scores.softmax(-1) @ v).sum().backward()

    product = 2 * b * h * t * t * d  # one (t x d) by (d x t) product per head
    assert count_flops(explicit) == 6 * product
    assert count_flops(fused) == count_flops(explicit) + product  # and the same twice: registered once
    with torch.no_grad():
        assert count_flops(lambda: F.scaled_dot_product_attention(q, key, v, attn_mask=mask)) == 2 * product
