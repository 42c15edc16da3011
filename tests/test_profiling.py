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
