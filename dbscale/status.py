"""Summaries of a run's jobs, read from their metrics.jsonl and checkpoint markers (no job is touched)."""

from __future__ import annotations

from dbscale.run import open_run
from dbscale.train.checkpoint import LATEST
from dbscale.train.metrics import read_metrics


def job_status(run, block: int | None) -> dict:
    job_dir = run.job_dir(block)
    events = read_metrics(job_dir / "metrics.jsonl")
    last = {e["event"]: e for e in events}
    latest = (job_dir / LATEST).read_text().strip() if (job_dir / LATEST).is_file() else None
    step = last["train"]["step"] if "train" in last else 0
    total = run.config.train.steps
    if not events:
        state = "not started"
    elif "end" in last and last["end"]["step"] >= total and events[-1]["event"] == "end":
        state = "done"
    elif events[-1]["event"] in ("end", "stopped", "nonfinite"):
        state = "stopped"
    else:
        state = "running or crashed"
    starts = [e for e in events if e["event"] == "start"]
    wall = None
    if starts and events:
        wall = round(sum((seg[-1]["time"] - seg[0]["time"]) for seg in _segments(events)), 1)
    interval = None
    if block is not None:
        interval = run.manifest["partition"]["block_intervals"][block]
    return {
        "job": "e2e" if block is None else f"block {block}",
        "sigma_interval": interval,
        "state": state,
        "step": step,
        "steps": total,
        "loss": last.get("train", {}).get("loss"),
        "val_loss": last.get("val", {}).get("val_loss"),
        "val_ce": last.get("val", {}).get("val_ce"),
        "tokens_per_s": last.get("train", {}).get("tokens_per_s"),
        "peak_mem_bytes": last.get("train", {}).get("peak_mem_bytes"),
        "params": starts[-1].get("params") if starts else None,
        "wall_s": wall,
        "checkpoint": latest,
    }


def _segments(events: list[dict]) -> list[list[dict]]:
    """Split events at each 'start' (one segment per launch of the job)."""
    segs: list[list[dict]] = []
    for e in events:
        if e["event"] == "start" or not segs:
            segs.append([])
        segs[-1].append(e)
    return segs


def run_status(root) -> list[dict]:
    run = open_run(root, verify=False)
    return [job_status(run, b) for b in range(run.num_blocks)] + [job_status(run, None)]


def format_table(rows: list[dict], space: str = "sigma") -> str:
    """The status table; `space` names what the intervals are in ('sigma', or 't' for the masked family)."""

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    header = (
        f"{'job':8} {space + ' interval':>17} {'state':>18} {'step':>11} {'loss':>9} {'val_loss':>9} {'val_ce':>7} "
        f"{'tok/s':>7} {'peak MiB':>8} {'params':>8} {'wall s':>7}  checkpoint"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        iv = "-" if r["sigma_interval"] is None else f"[{r['sigma_interval'][0]:.3g}, {r['sigma_interval'][1]:.3g}]"
        lines.append(
            f"{r['job']:8} {iv:>17} {r['state']:>18} {str(r['step']) + '/' + str(r['steps']):>11} "
            f"{fmt(r['loss'], '9.4g')} {fmt(r['val_loss'], '9.4g')} {fmt(r['val_ce'], '7.3f')} "
            f"{fmt(r['tokens_per_s'], '7.0f')} {fmt(r['peak_mem_bytes'] and r['peak_mem_bytes'] / 2**20, '8.0f')} "
            f"{'-' if r['params'] is None else format(r['params'] / 1e6, '7.2f') + 'M':>8} "
            f"{fmt(r['wall_s'], '7.1f')}  {r['checkpoint'] or '-'}"
        )
    return "\n".join(lines)
