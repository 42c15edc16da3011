"""Metrics of a job: one JSON line per event in metrics.jsonl, TensorBoard scalars, peak memory."""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import torch


def peak_memory_bytes() -> int:
    """Peak CUDA memory allocated by this process on GPU, else its peak resident set size."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


class MetricsLogger:
    """Appends events to `metrics.jsonl` (flushed per line: nothing is lost on a crash) and mirrors
    numeric fields to TensorBoard. Only rank 0 writes."""

    def __init__(self, job_dir: Path, enabled: bool):
        self.enabled = enabled
        self.file = None
        self.tb = None
        if enabled:
            job_dir.mkdir(parents=True, exist_ok=True)
            self.file = open(job_dir / "metrics.jsonl", "a", buffering=1)
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(job_dir / "tensorboard"))

    def log(self, event: str, step: int, **fields) -> None:
        if not self.enabled:
            return
        record = {"event": event, "step": step, "time": round(time.time(), 3), **fields}
        self.file.write(json.dumps(record) + "\n")
        os.fsync(self.file.fileno())
        for key, value in fields.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.tb.add_scalar(f"{event}/{key}", value, step)

    def close(self) -> None:
        if self.enabled:
            self.tb.flush()
            self.tb.close()
            self.file.close()


def read_metrics(path: Path) -> list[dict]:
    """All events of a metrics.jsonl; a torn last line (crash mid-write) is ignored."""
    events = []
    if not path.is_file():
        return events
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events
