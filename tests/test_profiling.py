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
