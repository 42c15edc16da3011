"""Measured memory and arithmetic: bytes autograd saves for backward, bytes of parameters, gradients and
optimizer state, and the floating-point operations a piece of code executes.

Saved tensors are counted once per storage (views of one tensor share it) and parameters are left out
(autograd saves weights by reference; they are counted as parameter bytes). FLOPs are counted by torch's
FlopCounterMode on the operators that run (matrix products and attention; elementwise work is not counted,
the usual convention for model FLOPs), 2 per multiply-add.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def saved_activation_bytes(fn: Callable[[], object], params: list[torch.Tensor] | None = None) -> dict:
    """Run fn() (a forward pass) and measure what autograd keeps for backward.

    Returns {'bytes': total over distinct storages, 'largest': bytes of the largest one, 'count': n}.
    """
    skip = {p.untyped_storage().data_ptr() for p in params or []}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in skip and ptr != 0:
            storages[ptr] = max(storages.get(ptr, 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return {"bytes": sum(storages.values()), "largest": max(storages.values(), default=0), "count": len(storages)}


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages among the given tensors (None entries ignored)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None and t.numel():
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Parameter, gradient, optimizer-state and buffer bytes of a model, as allocated now."""
    params = [p for p in model.parameters()]
    opt = 0
    if optimizer is not None:
        opt = tensor_bytes(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))
    return {
        "parameters": tensor_bytes(params),
        "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
        "gradients": tensor_bytes(p.grad for p in params),
        "optimizer": opt,
        "buffers": tensor_bytes(model.buffers()),
    }


def _register_cpu_attention_flops() -> None:
    """torch counts the CUDA attention kernels but not the CPU one scaled_dot_product_attention runs; give it the
    formula torch uses for its fused kernels: the full T x S score matrix whatever the mask, two products
    forward, five backward (the four of the gradients and the recomputed scores)."""
    from torch.utils import flop_counter

    aten = torch.ops.aten
    forward, backward = (
        aten._scaled_dot_product_flash_attention_for_cpu,
        aten._scaled_dot_product_flash_attention_for_cpu_backward,
    )
    if forward in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(forward)
    def _forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query, key, value)

    @flop_counter.register_flop_formula(backward)
    def _backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


def count_flops(fn: Callable[[], object]) -> int:
    """The floating-point operations fn() executes (forward and, if it runs one, backward), on CPU or CUDA."""
    from torch.utils.flop_counter import FlopCounterMode

    _register_cpu_attention_flops()
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())
