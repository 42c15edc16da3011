"""Bring bench/results/*.json written before the schema to it: every result records command, device_info, date
and commit at its top level (bench/common.py write_results writes them for every new result).

    python bench/migrate_results.py            # idempotent: files that have all four are left alone

For an older file the four are filled from what the file and the repository hold, and `provenance` says so:
- command: the file's own (some benches kept it under `bench`), else null with `command_note` naming the doc
  that gives it (the command was not recorded when it was measured);
- date, commit: those of the commit that added the file (when it was measured, to within that commit);
- device_info: the file's `device` if it has one, else a note: every session so far measured on the project's
  2-core CPU machine (no GPU has been lent; a GPU result is named *_cuda.json).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT  # noqa: E402

SCHEMA = ("command", "device_info", "date", "commit")
CPU_NOTE = (
    "not recorded when measured; every session before the schema measured on the project's 2-core CPU machine "
    "(fp32, no GPU lent)"
)


def added(path: Path) -> tuple[str | None, str | None]:
    """(commit, ISO date) of the commit that added `path`."""
    out = subprocess.run(
        ["git", "log", "--diff-filter=A", "--format=%H %cI", "--", str(path.relative_to(ROOT))],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout.split("\n")
    lines = [x for x in out if x.strip()]
    return tuple(lines[-1].split(" ", 1)) if lines else (None, None)


def documented_in(name: str) -> str | None:
    """The first doc under docs/ (or the README) that names the file."""
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        if name in doc.read_text():
            return str(doc.relative_to(ROOT))
    return None


def migrate(path: Path) -> bool:
    data = json.loads(path.read_text())
    if all(k in data for k in SCHEMA):
        return False
    notes = []
    if "command" not in data:
        data["command"] = (data.get("bench") or {}).get("command")
        if data["command"] is None:
            doc = documented_in(path.name)
            data["command_note"] = f"not recorded when measured; see {doc}" if doc else "not recorded when measured"
        notes.append("command")
    if "date" not in data or "commit" not in data:
        commit, date = added(path)
        data.setdefault("date", date)
        data.setdefault("commit", commit)
        notes.append("date and commit: the commit that added this file")
    if "device_info" not in data:
        data["device_info"] = {"device": data["device"]} if "device" in data else {"note": CPU_NOTE}
        notes.append("device_info")
    data["provenance"] = "migrated to the results schema by bench/migrate_results.py: " + "; ".join(notes)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return True


def main() -> int:
    changed = [p.name for p in sorted(RESULTS.glob("*.json")) if migrate(p)]
    print(f"[migrate] {len(changed)} file(s) brought to the schema: {', '.join(changed) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
