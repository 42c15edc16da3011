"""A run's report: PNG figures and an index.html, from the run's own files (no network).

R/report/partition.png    the log-normal noise density with each block's interval and overlap (paper Fig. 1)
R/report/losses.png       training and validation cross-entropy of every job against the baseline's
R/report/throughput.png   tokens/s and peak memory per job
R/report/index.html       the figures, the status table, the evaluation table and samples
"""

from __future__ import annotations

import html
import json
import os
import shutil
import tempfile
from pathlib import Path

from dbscale import families
from dbscale.plotting import COLORS, pyplot
from dbscale.run import Run, open_run
from dbscale.status import format_table, run_status
from dbscale.train.metrics import read_metrics

PENDING_NOTE = (
    "noise partition: calibration pending (prepare was interrupted); no block can train yet. "
    "Fix: run tools/prepare.py again with the same --config and --run."
)


def partition_figure(run: Run, path: Path) -> None:
    """The run's partition, drawn by its family; a note while the calibration is pending."""
    plt = pyplot()
    if run.manifest["partition"].get("pending"):  # prepare was interrupted before the calibration
        fig, ax = plt.subplots(figsize=(8, 1.6))
        ax.axis("off")
        ax.text(0.5, 0.5, PENDING_NOTE, ha="center", va="center", wrap=True, fontsize=9)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return
    families.get(run.config.model.family).partition_figure(run, path, plt)


def _jobs(run: Run) -> list[tuple[str, list[dict]]]:
    jobs = [(f"block {b}", read_metrics(run.job_dir(b) / "metrics.jsonl")) for b in range(run.num_blocks)]
    return [*jobs, ("end-to-end", read_metrics(run.job_dir(None) / "metrics.jsonl"))]


def _last_per_step(events: list[dict], kind: str, key: str) -> tuple[list[int], list[float]]:
    """Steps replayed after a resume appear twice; the later value wins."""
    by_step = {e["step"]: e[key] for e in events if e["event"] == kind and e.get(key) is not None}
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def loss_figure(run: Run, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for i, (name, events) in enumerate(_jobs(run)):
        style = {"color": "black", "lw": 2} if name == "end-to-end" else {"color": COLORS[i % len(COLORS)], "lw": 1.2}
        steps, ce = _last_per_step(events, "train", "ce")
        if steps:
            axes[0].plot(steps, ce, label=name, **style)
        steps, val = _last_per_step(events, "val", "val_ce")
        if steps:
            axes[1].plot(steps, val, marker="o", label=name, **style)
    axes[0].set_title("training cross-entropy (unweighted)")
    axes[1].set_title("validation cross-entropy")
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_ylabel("nats / token")
        ax.legend(fontsize=7)
    fig.text(
        0.01,
        0.01,
        "A block's CE is on its own noise slice (the noisy target carries information there); "
        "compare chains with tools/evaluate.py.",
        fontsize=7,
    )
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def throughput_figure(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    names = [r["job"] for r in rows]
    colors = ["black" if n == "e2e" else COLORS[i % len(COLORS)] for i, n in enumerate(names)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    tps = [r["tokens_per_s"] or 0 for r in rows]
    mem = [(r["peak_mem_bytes"] or 0) / 2**20 for r in rows]
    axes[0].bar(names, tps, color=colors)
    axes[0].set_title("training tokens/s per job")
    axes[1].bar(names, mem, color=colors)
    axes[1].set_title("peak memory per job, MiB", fontsize=11)
    axes[1].text(
        0.5,
        -0.18,
        "process peak RSS on CPU (includes the ~0.7 GiB runtime), CUDA peak on GPU",
        transform=axes[1].transAxes,
        ha="center",
        fontsize=7,
    )
    for ax, vals, fmt in ((axes[0], tps, "{:.0f}"), (axes[1], mem, "{:.0f}")):
        for x, v in enumerate(vals):
            ax.text(x, v, fmt.format(v), ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _html(run: Run, status_table: str, evaluation: dict | None) -> str:
    esc = html.escape
    parts = [
        "<!doctype html><meta charset='utf-8'>",
        f"<title>dbscale report: {esc(run.config.name)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto} pre{background:#f4f4f4;padding:1em;"
        "overflow-x:auto} img{max-width:100%} td,th{padding:4px 8px;text-align:left}</style>",
        f"<h1>Run {esc(run.config.name)}</h1><p>{esc(str(run.root))}, run id {esc(run.run_id)}, "
        f"B={run.num_blocks}, layers per block {families.layer_allocation(run.config)}</p>",
        "<h2>Noise partition</h2><img src='partition.png' alt='noise partition'>",
        "<h2>Losses</h2><img src='losses.png' alt='loss curves'>",
        "<h2>Throughput and memory</h2><img src='throughput.png' alt='throughput and memory'>",
        f"<h2>Jobs</h2><pre>{esc(status_table)}</pre>",
    ]
    if evaluation:
        from dbscale.eval.protocol import format_table as eval_table

        parts.append(f"<h2>Evaluation</h2><pre>{esc(eval_table(evaluation))}</pre>")
        parts.append(f"<p>{esc(evaluation.get('protocol', ''))}</p><h2>Samples</h2>")
        for r in evaluation["results"]:
            parts.append(
                f"<h3>{esc(r['label'])}</h3><table><tr><th>prompt</th><th>continuation</th><th>reference</th></tr>"
            )
            for smp in r["samples"]:
                parts.append(
                    f"<tr><td>{esc(smp['prompt'])}</td><td><b>{esc(smp['continuation'])}</b></td>"
                    f"<td>{esc(smp['reference'])}</td></tr>"
                )
            parts.append("</table>")
    else:
        parts.append(
            "<p>No evaluation yet: run tools/evaluate.py --model R/merged --compare R/e2e/merged "
            "--data R --out R/report/eval.json, then this tool again.</p>"
        )
    return "\n".join(parts)


def write_report(run_dir: str | Path, evaluation_path: str | Path | None = None) -> Path:
    run = open_run(run_dir, verify=False)
    out = run.root / "report"
    evaluation = None
    candidate = Path(evaluation_path) if evaluation_path else out / "eval.json"
    if candidate.is_file():
        evaluation = json.loads(candidate.read_text())
    rows = run_status(run.root)
    staging = Path(tempfile.mkdtemp(prefix=".report-", dir=run.root))
    try:
        partition_figure(run, staging / "partition.png")
        loss_figure(run, staging / "losses.png")
        throughput_figure(rows, staging / "throughput.png")
        if evaluation is not None:
            (staging / "eval.json").write_text(json.dumps(evaluation, indent=2))
        space = families.get(run.config.model.family).space
        (staging / "index.html").write_text(_html(run, format_table(rows, space), evaluation))
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out
