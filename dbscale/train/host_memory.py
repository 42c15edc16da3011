"""A training job's host (CPU) memory: return freed tensor memory to the operating system.

glibc's malloc serves a request above its mmap threshold with its own mapping, unmapped again on free; below
it, from the heap, where a freed block stays part of the process. The threshold starts at 128 KiB and rises
each time a mapped block is freed, up to 32 MiB, so after a few steps the activations, logits chunks and
optimizer temporaries of a training step come from the heap and the job's resident memory stays at its
high-water mark of freed tensors (measured on the paper-shape block job: bench/memory.py,
docs/results/performance.md). Fixing the threshold (mallopt M_MMAP_THRESHOLD, which also stops it rising)
returns every freed tensor of at least that size at once; the job's peak is then what it holds, not what
it once held. Nothing computed changes. CUDA memory has its own caching allocator and is not affected.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def set_mmap_threshold(threshold: int) -> bool:
    """Serve host allocations of >= `threshold` bytes with their own mappings (0: leave glibc's default).
    Returns whether it was applied (False off Linux/glibc)."""
    if threshold <= 0 or not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
