"""Preparing a corpus: peak memory and tokens/s against corpus size and tokenizer workers, and the shards' bytes.

    python bench/prepare.py                          # 10 MB, 100 MB and 1 GB; 1 and 2 workers (about 10 min)
    python bench/prepare.py --sizes 10,100 --workers 1,2

For each size a corpus is generated in a temporary folder: .jsonl files of at most 100 MB (like OpenWebText's
shards), documents of 1-12 paragraphs of the bundled speeches drawn with a fixed seed (about 4 KB on average).
Each (size, workers) runs `python tools/prepare.py` in a fresh process group, polling /proc every 50 ms for the
summed RSS of the prepare and its worker processes. Reported: peak RSS (whole tree and the largest process),
prepare wall time, tokenizing time and tokens/s (from prepare's final line), and whether the shards' sha256s
are the same for every worker count. Writes bench/results/prepare.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, write_results  # noqa: E402

FILE_BYTES = 100 * 2**20


def generate_corpus(folder: Path, megabytes: int, seed: int = 0) -> dict:
    from dbscale.data.sources import bundled_speeches_dir

    paragraphs = [p for f in sorted(bundled_speeches_dir().glob("*.txt")) for p in f.read_text().split("\n\n")]
    paragraphs = [p.strip() for p in paragraphs if p.strip()]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    target, written, docs, files = megabytes * 2**20, 0, 0, 0
    out = None
    while written < target:
        if out is None or out.tell() >= FILE_BYTES:
            if out is not None:
                out.close()
            out = open(folder / f"part_{files:04d}.jsonl", "w", encoding="utf-8")
            files += 1
        picks = rng.integers(0, len(paragraphs), size=int(rng.integers(1, 13)))
        line = json.dumps({"text": "\n\n".join(paragraphs[i] for i in picks)}) + "\n"
        out.write(line)
        written += len(line.encode("utf-8"))
        docs += 1
    out.close()
    return {"bytes": written, "documents": docs, "files": files}


def tree_rss(root_pid: int) -> tuple[int, int]:
    """(summed RSS, largest RSS) in bytes of `root_pid` and every descendant."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/status") as f:
                kb = next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
        rss[int(entry)] = kb * 1024
    tree, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    values = [rss.get(pid, 0) for pid in tree]
    return sum(values), max(values, default=0)


def prepare_once(corpus: Path, run: Path, workers: int, args) -> dict:
    cmd = [
        sys.executable,
        str(ROOT / "tools" / "prepare.py"),
        "--config",
        args.config,
        "--run",
        str(run),
        "--set",
        "data.source=files",
        "--set",
        f"data.paths={json.dumps([str(corpus)])}",
        "--set",
        f"data.num_workers={workers}",
        *[a for s in args.set for a in ("--set", s)],
    ]
    log = run.parent / f"{run.name}.log"
    t0 = time.time()
    with open(log, "w") as out:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        peak = largest = 0
        while p.poll() is None:
            total, big = tree_rss(p.pid)
            peak, largest = max(peak, total), max(largest, big)
            time.sleep(0.05)
    wall = time.time() - t0
    text = log.read_text()
    if p.returncode != 0:
        raise SystemExit(f"prepare failed ({' '.join(cmd)}):\n{text[-3000:]}")
    final = re.search(r"\[prepare\] ([\d,]+) train tokens .*? ([\d,]+) validation tokens .*?; ([\d.]+)s", text)
    train, val, tokenize_s = int(final[1].replace(",", "")), int(final[2].replace(",", "")), float(final[3])
    manifest = json.loads((run / "manifest.json").read_text())
    return {
        "workers": workers,
        "peak_rss_bytes": peak,
        "largest_process_rss_bytes": largest,
        "wall_s": round(wall, 2),
        "tokenize_s": tokenize_s,
        "train_tokens": train,
        "val_tokens": val,
        "tokens_per_s": round((train + val) / tokenize_s),
        "shard_sha256": [r["sha256"] for split in ("train", "val") for r in manifest["data"][split]],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10,100,1000", help="corpus sizes in MB")
    p.add_argument("--workers", default="1,2", help="data.num_workers values")
    p.add_argument("--config", default="configs/llama_tiny.yaml", help="recipe whose data settings prepare uses")
    p.add_argument(
        "--set",
        action="append",
        default=["diffusion.partition=equiprobable"],  # no calibration run: this measures preparing the data
        help="extra overrides for prepare",
    )
    p.add_argument("--tmp", default=None, help="folder for the generated corpora and runs (default: the system's)")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    workers = [int(w) for w in args.workers.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="dbscale-bench-prepare-", dir=args.tmp) as tmp:
        for size in sizes:
            corpus = Path(tmp) / f"corpus_{size}mb"
            t0 = time.time()
            info = generate_corpus(corpus, size)
            print(f"[bench] {size} MB corpus: {info['documents']:,} documents in {info['files']} file(s), "
                  f"generated in {time.time() - t0:.0f}s", flush=True)  # fmt: skip
            for w in workers:
                run = Path(tmp) / f"run_{size}_{w}"
                row = {"corpus_mb": size, **info, **prepare_once(corpus, run, w, args)}
                rows.append(row)
                print(f"[bench]   {w} worker(s): peak RSS {row['peak_rss_bytes'] / 2**20:,.0f} MiB, "
                      f"{row['tokens_per_s']:,} tokens/s, {row['wall_s']:.0f}s", flush=True)  # fmt: skip
                shutil.rmtree(run)
            shutil.rmtree(corpus)
    same = {}
    for size in sizes:
        hashes = {json.dumps(r["shard_sha256"]) for r in rows if r["corpus_mb"] == size}
        same[str(size)] = len(hashes) == 1
    by_size = {s: max(r["peak_rss_bytes"] for r in rows if r["corpus_mb"] == s) for s in sizes}
    ratio = by_size[max(sizes)] / by_size[sorted(sizes)[-2]] if len(sizes) > 1 else None
    summary = {
        "same_shards_for_every_worker_count": same,
        "peak_rss_ratio_largest_to_next": round(ratio, 3) if ratio else None,
    }
    path = write_results("prepare.json", {"rows": rows, "summary": summary})
    print(f"\n{'corpus':>8} {'docs':>10} {'workers':>7} {'peak RSS MiB':>12} {'largest MiB':>11} "
          f"{'tokens':>12} {'tokens/s':>10} {'wall s':>7}")  # fmt: skip
    for r in rows:
        print(f"{r['corpus_mb']:>6}MB {r['documents']:>10,} {r['workers']:>7} {r['peak_rss_bytes'] / 2**20:>12,.0f} "
              f"{r['largest_process_rss_bytes'] / 2**20:>11,.0f} {r['train_tokens'] + r['val_tokens']:>12,} "
              f"{r['tokens_per_s']:>10,} {r['wall_s']:>7.0f}")  # fmt: skip
    print(f"\nsame shards for every worker count: {same}; peak RSS {max(sizes)} MB / {sorted(sizes)[-2]} MB: "
          f"{summary['peak_rss_ratio_largest_to_next']}")  # fmt: skip
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
