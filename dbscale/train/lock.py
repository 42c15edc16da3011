"""One writer per job directory: a lock file naming the owner's host and pid, with stale-lock detection."""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from pathlib import Path

from dbscale.errors import RunError

LOCK = "job.lock"


def process_alive(pid: int) -> bool:
    """Whether a process of this host with this pid exists (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class JobLock:
    """`job_dir/job.lock`, created with O_EXCL. A lock held by a dead process on this host is stale and taken
    over with a warning; a lock from another host is never broken automatically (its pid cannot be checked)."""

    def __init__(self, job_dir: Path, job: str):
        self.path = Path(job_dir) / LOCK
        self.job = job
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None or (owner.get("host") == me["host"] and not process_alive(int(owner.get("pid", -1)))):
                    warnings.warn(
                        f"{self.path}: taking over a stale lock ({owner}); its job is no longer running.", stacklevel=2
                    )
                    self.path.unlink(missing_ok=True)
                    continue
                raise RunError(
                    f"{self.path}: {self.job} is already running (host {owner.get('host')}, pid {owner.get('pid')}, "
                    f"since {owner.get('since')}); two jobs must never write the same directory. Fix: wait for it or "
                    f"stop it; if it died on another machine, delete {self.path}."
                ) from None
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(me, f)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:  # a full disk: leave no empty lock behind for the next launch to trip on
                self.path.unlink(missing_ok=True)
                raise RunError(
                    f"{self.path}: could not write the job lock ({e.strerror or e}); nothing was started or changed. "
                    "Fix: free disk space (or quota) on this filesystem, then rerun the same command."
                ) from None
            self.held = True
            return
        raise RunError(f"{self.path}: could not take the job lock. Fix: delete the file if no job is running.")

    def _owner(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            # a lock file being written right now is younger than a second; an unreadable old one is debris
            try:
                return {"host": "?", "pid": -1} if time.time() - self.path.stat().st_mtime < 1 else None
            except OSError:
                return None

    def release(self) -> None:
        if self.held:
            owner = self._owner()
            if owner and owner.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False
