"""Find and kill host processes that belong to one sandbox.

Who calls it: ``registry`` on destroy (after killing the jail), as the only teardown in
``none`` mode and as a final sweep under bwrap. A sandbox process is recognised by
``MODBOX_SANDBOX_ID=<id>`` in its environment, which every sandbox process inherits
from the supervisor (a process that scrubs its own environment can hide from this in
``none`` mode; under bwrap the pid namespace takes everything down anyway).

Blocking: callers run these in a worker thread.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time


def sandbox_pids(sandbox_id: str) -> set[int]:
    """Pids whose environment carries MODBOX_SANDBOX_ID=<sandbox_id>."""
    marker = f"MODBOX_SANDBOX_ID={sandbox_id}".encode()
    me = os.getpid()
    found: set[int] = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue  # exited meanwhile, or a kernel thread
        if marker in env.split(b"\0"):
            found.add(int(entry.name))
    return found


def kill_sandbox_processes(
    sandbox_id: str, grace: float = 2.0, *, confirm: bool = True
) -> set[int]:
    """SIGKILL every process of the sandbox until none is left; return the survivors.

    With ``confirm``, "none left" takes two empty scans in a row, 50 ms apart: a process
    that was forking when its parent got SIGKILL can surface just after a scan came back
    empty. Without it (the caller knows the sandbox's pid namespace has ended, so no
    process can be born in it) one empty scan is enough.
    """
    deadline = time.monotonic() + grace
    empty_scans = 0
    while True:
        pids = sandbox_pids(sandbox_id)
        if not pids:
            empty_scans += 1
            if empty_scans >= (2 if confirm else 1):
                return pids
            time.sleep(0.05)
            continue
        empty_scans = 0
        if time.monotonic() >= deadline:
            return pids
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
