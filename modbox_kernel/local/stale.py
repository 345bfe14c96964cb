"""Reaping what a killed service left behind: its temporary state directory.

Who calls it: ``__main__`` at startup, before creating its own state dir. A service that
is SIGKILLed cannot remove its temp dir (workspaces included); its jails die with it
(``--die-with-parent``), so the next start removes dirs whose owner pid is dead
(``docs/isolation.md``, "Adversarial cases", case 44).
``cgroups.CgroupManager.reap_stale`` does the same for cgroups. Only names this module
generates are touched.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path

PREFIX = "modbox-local-"
_NAME = re.compile(rf"^{re.escape(PREFIX)}(\d+)-[A-Za-z0-9_]+$")


def make_state_dir() -> Path:
    """A fresh temp dir whose name carries our pid, so a later start can reap it."""
    return Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-"))


def reap_stale_state_dirs(parent: Path | None = None) -> list[Path]:
    """Remove temp state dirs whose owning service is gone; returns what was removed."""
    base = parent or Path(tempfile.gettempdir())
    removed = []
    with contextlib.suppress(OSError):
        for entry in base.iterdir():
            match = _NAME.match(entry.name)
            if match is None or not entry.is_dir() or entry.is_symlink():
                continue
            if _alive(int(match.group(1))):
                continue
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie has exited (its parent has not reaped it yet).
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
