"""Remembering, until the next boot, that a bubblewrap probe jail worked.

Who calls it: ``isolation._working_bwrap_jail``, for each jail it would probe. The
probe (a real jail of the exact shape a sandbox gets) costs about 70 ms, and every
embedded service pays it at every kernel start and restart, before its first sandbox
can start. What makes a probe pass does not change while the machine runs: the kernel
and its namespace settings, the bwrap binary, the uid the jails run as, the seccomp
program and the code that builds the jail. So a passed probe is recorded under a key
made of exactly those (:func:`probe_key`); a later start with the same key starts its
jails without probing again. Failures are never recorded: a jail that failed is probed
again next time. ``--check`` always probes.

The record is a file in the user's cache folder, trusted only when it belongs to this
user and nobody else can write it or its folder. A forged record could at worst make
the service try bubblewrap without a probe: its first sandbox then fails with bwrap's
own error. It can never turn isolation off.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
import sys
import tempfile
from pathlib import Path

from . import jail as jail_module
from . import launcher, seccomp
from .jail import SUPERVISOR_SOURCE, BwrapJail

log = logging.getLogger(__name__)

#: Keys remembered at most (one per jail shape; a few per machine in practice).
KEEP_KEYS = 16
#: Settings that decide whether unprivileged user namespaces work (part of the key).
USERNS_SETTINGS = (
    "/proc/sys/user/max_user_namespaces",
    "/proc/sys/kernel/unprivileged_userns_clone",
    "/proc/sys/kernel/apparmor_restrict_unprivileged_userns",
)


def cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "modbox-kernel" / "bwrap-probes"


def probe_key(jail: BwrapJail) -> str | None:
    """What a passed probe of ``jail`` depends on, hashed; None when it cannot be told
    (no boot id: then every start probes)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        binary = os.stat(jail.bwrap)
    except OSError:
        return None
    digest = hashlib.sha256()
    privilege = jail.privilege
    parts = [
        boot,
        os.uname().release,
        f"{os.geteuid()}:{os.getegid()}",
        os.path.realpath(jail.bwrap),
        os.path.realpath(sys.executable),
        f"{binary.st_ino}:{binary.st_size}:{binary.st_mtime_ns}:{binary.st_ctime_ns}",
        f"{binary.st_mode}:{binary.st_uid}",
        jail.prlimit,
        # Not the stage folder itself: each service has its own (a fresh state dir).
        repr((privilege.drop, privilege.setpriv, privilege.unshare, privilege.stage_dir is None)),
        ",".join(sorted(jail.optional_flags)),
    ]
    # Namespace settings an administrator may change without a reboot.
    for setting in USERNS_SETTINGS:
        with contextlib.suppress(OSError):
            parts.append(f"{setting}={Path(setting).read_text().strip()}")
    for part in parts:
        digest.update(part.encode() + b"\0")
    digest.update(jail.seccomp_program or b"")
    # The code that builds the jail: a changed jail shape is probed again.
    sources = [Path(str(m.__file__)) for m in (jail_module, launcher, seccomp)]
    for source in [*sources, Path(SUPERVISOR_SOURCE)]:
        with contextlib.suppress(OSError):
            digest.update(source.read_bytes())
    return digest.hexdigest()


def _trusted(path: Path) -> bool:
    """Ours, and writable by nobody else (the file and its folder)."""
    for item in (path.parent, path):
        try:
            info = os.lstat(item)
        except OSError:
            return False
        if info.st_uid != os.geteuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return False
        if item is path and not stat.S_ISREG(info.st_mode):
            return False
    return True


def _keys(path: Path) -> list[str]:
    if not _trusted(path):
        return []
    try:
        return path.read_text().split()
    except (OSError, UnicodeDecodeError):
        return []


def passed_before(key: str | None, path: Path | None = None) -> bool:
    """Whether a probe with ``key`` passed since the machine booted."""
    return key is not None and key in _keys(path or cache_file())


def forget(path: Path | None = None) -> None:
    """Drop every record (a bwrap jail failed after all, or ``--check`` failed): the
    next start probes again."""
    with contextlib.suppress(OSError):
        (path or cache_file()).unlink()


def remember(key: str | None, path: Path | None = None) -> None:
    """Record a passed probe (best effort: a read-only home only costs the next probe)."""
    if key is None:
        return
    path = path or cache_file()
    kept = [k for k in _keys(path) if k != key][-(KEEP_KEYS - 1) :]
    keys = [*kept, key]
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".probes-")
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(keys) + "\n")
        os.replace(temporary, path)
    except OSError as exc:
        log.debug("could not record the bwrap probe: %s", exc)
