"""Measured memory: bytes autograd saves for backward, and bytes of parameters, gradients and optimizer state.

Saved tensors are counted once per storage (views of one tensor share it) and parameters are left out
(autograd saves weights by reference; they are counted as parameter bytes).
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
