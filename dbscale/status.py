"""Summaries of a run's jobs, read from their metrics.jsonl and verified checkpoint markers (no job is touched,
no checkpoint is unpickled)."""

from __future__ import annotations

from dbscale.errors import CheckpointError
from dbscale.run import open_run
from dbscale.train.checkpoint import find_resumable
from dbscale.train.metrics import read_metrics


def checkpoint_status(run, block: int | None) -> tuple[str | None, int | None, str | None]:
    """(tag, step, problem) of the job's newest intact checkpoint, as a resume would choose it: every listed
    file's size and sha256, no unlisted file, the pickle screen. problem: why there is none to resume from."""
    try:
        info = find_resumable(run.job_dir(block), run.run_id, block)
    except CheckpointError as e:
        return None, None, str(e)
    return (info.tag, info.step, None) if info else (None, None, None)


def job_status(run, block: int | None) -> dict:
    import warnings

    job_dir = run.job_dir(block)
    events = read_metrics(job_dir / "metrics.jsonl")
    last = {e["event"]: e for e in events}
    with warnings.catch_warnings():  # a damaged newer tag that is skipped shows as an older checkpoint step
        warnings.simplefilter("ignore")
        tag, saved_step, problem = checkpoint_status(run, block)
    step = last["train"]["step"] if "train" in last else 0
    starts = [e for e in events if e["event"] == "start"]
    # the job's own target: a launch may override train.steps for this job only (--set train.steps=...)
    total = starts[-1].get("steps", run.config.train.steps) if starts else run.config.train.steps
    if problem is not None:
        state = "checkpoint refused" if "refused:" in problem else "checkpoint damaged"
    elif not events:
        state = "not started"
    elif "end" in last and last["end"]["step"] >= total and events[-1]["event"] == "end" and saved_step == total:
        state = "done"
    elif events[-1]["event"] in ("end", "stopped", "nonfinite"):
        state = "stopped"
    else:
        state = "running or crashed"
    wall = None
    if starts and events:
        wall = round(sum((seg[-1]["time"] - seg[0]["time"]) for seg in _segments(events)), 1)
    interval = None
    if block is not None and not run.manifest["partition"].get("pending"):
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
        "checkpoint": tag,
        "checkpoint_step": saved_step,
        "problem": problem,
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
    notes = []
    for r in rows:
        iv = "-" if r["sigma_interval"] is None else f"[{r['sigma_interval'][0]:.3g}, {r['sigma_interval'][1]:.3g}]"
        lines.append(
            f"{r['job']:8} {iv:>17} {r['state']:>18} {str(r['step']) + '/' + str(r['steps']):>11} "
            f"{fmt(r['loss'], '9.4g')} {fmt(r['val_loss'], '9.4g')} {fmt(r['val_ce'], '7.3f')} "
            f"{fmt(r['tokens_per_s'], '7.0f')} {fmt(r['peak_mem_bytes'] and r['peak_mem_bytes'] / 2**20, '8.0f')} "
            f"{'-' if r['params'] is None else format(r['params'] / 1e6, '7.2f') + 'M':>8} "
            f"{fmt(r['wall_s'], '7.1f')}  {r['checkpoint'] or '-'}"
        )
        for key in ("problem", "error"):
            if r.get(key):
                notes.append(f"{r['job']}: {r[key]}")
    return "\n".join(lines + notes)
