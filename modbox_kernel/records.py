"""The sandboxes this user's kernels made, on disk, so a dead kernel's can be found.

Who calls what, and when: the session's keeper (``keeper.py``) calls :func:`remember`
right after a create on a shared or remote service and :func:`forget` once the sandbox
is destroyed; a kernel that dies without a shutdown (SIGKILL, its parent gone) leaves
its record behind. :func:`dead` lists the records whose kernel process is gone: the
next kernel's start (``keeper.sweep``) destroys those sandboxes, and so does
``python -m modbox_kernel cleanup`` (``cleanup.py``). The embedded service needs none
of this: its sandboxes die with it and the kernel.

One small JSON file per sandbox, in a 0700 folder under the user's state directory
(``$XDG_STATE_HOME/modbox-kernel/sandboxes``, else ``~/.local/state/…``); no token is
ever written (the caller uses its own credentials to destroy). A record only ever
names sandboxes this user's kernels made, so a cleanup never touches anyone else's.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

#: A record older than the longest TTL Modbox allows (a day) names a sandbox that is
#: gone in any case: it is dropped rather than kept forever.
FORGET_AFTER_S = 25 * 3600


@dataclass(frozen=True)
class Record:
    """One sandbox a kernel made: where, and which process made it."""

    sandbox_id: str
    api_url: str
    workspace_id: str | None
    pid: int
    pid_started: str  # the kernel process's start time (/proc/<pid>/stat field 22)

    def kernel_alive(self) -> bool:
        return process_started(self.pid) == self.pid_started


def folder() -> Path:
    """Where the records live (created 0700 on first use)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "modbox-kernel" / "sandboxes"


def process_started(pid: int) -> str:
    """A process's start time, so a reused pid is not taken for the kernel; "" if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return ""
    return fields[19] if len(fields) > 19 and fields[0] != "Z" else ""


def remember(sandbox_id: str, api_url: str, workspace_id: str | None) -> Record:
    """Record a sandbox this process just made."""
    record = Record(sandbox_id, api_url, workspace_id, os.getpid(), process_started(os.getpid()))
    where = folder()
    where.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = where / f"{_safe(sandbox_id)}.json"
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(record), f)
    os.replace(tmp, path)
    return record


def forget(sandbox_id: str) -> None:
    try:
        (folder() / f"{_safe(sandbox_id)}.json").unlink()
    except OSError:
        pass


def dead(api_url: str | None = None) -> list[Record]:
    """Records whose kernel process is gone (of one service, if ``api_url`` is given)."""
    found = []
    try:
        paths = sorted(folder().glob("*.json"))
    except OSError:
        return []
    for path in paths:
        try:
            if time.time() - path.stat().st_mtime > FORGET_AFTER_S:
                path.unlink()  # past any TTL: that sandbox is gone, whatever the service
                continue
            record = Record(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue  # not ours, or half written: leave it
        if api_url is not None and record.api_url.rstrip("/") != api_url.rstrip("/"):
            continue
        if not record.kernel_alive():
            found.append(record)
    return found


def _safe(sandbox_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in sandbox_id)
