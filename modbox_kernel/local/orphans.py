"""Reaping the jail processes bwrap leaves behind as zombies.

Who calls it: ``__main__`` calls :func:`become_subreaper` once at startup; the
registry's reaper loop calls :func:`reap` every half second with the pids it still
waits for itself.

Why: when a jail ends by itself (``os.kill(-1, 9)`` inside, its supervisor crashed),
bwrap's outer process exits as soon as the jail's pid 1 reports its status, without
waiting for it, so that pid 1 is orphaned and becomes a zombie of whoever adopts it.
Normally that is the host's init, which may be slow to reap (or, when the service is
itself pid 1 of a container, nobody would). As a child subreaper the service adopts
them and reaps them here. Only zombies that are not one of our own live children are
touched, so asyncio's child watchers never lose an exit status.

Blocking (reads /proc); callers run it in a worker thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os

log = logging.getLogger(__name__)

_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Adopt orphaned descendants (Linux >= 3.4). False if the kernel refused."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def reap(keep: set[int]) -> list[int]:
    """Reap zombie children not in ``keep``; returns the pids reaped."""
    me = os.getpid()
    reaped = []
    for pid in _children(me):
        if pid in keep or not _is_zombie(pid):
            continue
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                reaped.append(pid)
    if reaped:
        log.debug("reaped orphaned jail processes %s", reaped)
    return reaped


def _children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError):
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    found += [int(x) for x in f.read().split()]
    return found


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False
