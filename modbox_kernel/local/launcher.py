"""What runs between the service and bwrap: cgroups, OOM score, privilege drop.

Who calls it: ``jail`` puts :func:`prefix` in front of every sandbox's command line;
``isolation`` builds the :class:`Privilege` once at startup. Nothing here starts a
process.

The chain, every link exec'ing the next in place (so bwrap's ``--die-with-parent`` still
watches the service's event-loop thread; ``docs/isolation.md``, "The launch chain")::

    [unshare --mount]  sh -c LAUNCHER …  [setpriv --reuid=N …]  bwrap …

* ``sh -c LAUNCHER`` (as the service's user) writes its pid into the sandbox's
  cgroups, raises its ``oom_score_adj`` to 1000 (so when the *host* runs out of memory
  the kernel kills sandbox processes before the service or Jupyter), and, when the
  privileges are dropped, stages the read-only binds (below). Its argv holds only
  paths the service generated, never anything a caller sent.
* When the service runs as root, ``setpriv`` drops to a dedicated unprivileged uid/gid
  with no supplementary groups before bwrap runs, so bwrap is unprivileged: the jail
  holds no capability, its user namespace maps only that uid, RLIMIT_NPROC is enforced
  (it is void for uid 0; ``docs/isolation.md``, "rlimits inside the jail") and the
  sandbox's processes are that uid on the host too.
* Staging: the dropped uid cannot reach the service's Python when it lives under a
  private directory (a pyenv under root's home, mode 700), and bwrap resolves bind
  sources with its own credentials (even ``--ro-bind-fd``: it realpath()s
  ``/proc/self/fd/N``). So the launcher, still root, runs in a private mount namespace
  (``unshare --mount``, propagation private: nothing appears in the host's mount table,
  and it vanishes with the sandbox), mounts a small tmpfs on the state dir's ``stage``
  directory and bind-mounts each source there read-only; bwrap then binds ``stage/<i>``
  to the real path inside the jail.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# $1: number of cgroup.procs files, then the files; then the stage dir ("" for none),
# the number of sources to stage and the sources; then the command to exec.
LAUNCHER_SCRIPT = """set -e
n=$1; shift
while [ "$n" -gt 0 ]; do echo $$ > "$1"; shift; n=$((n - 1)); done
echo 1000 > /proc/self/oom_score_adj
stage=$1; n=$2; shift 2
if [ -n "$stage" ]; then
  mount -t tmpfs -o mode=0755,size=1m,nosuid,nodev modbox-stage "$stage"
  i=0
  while [ "$i" -lt "$n" ]; do
    if [ -d "$1" ]; then mkdir "$stage/$i"; else : > "$stage/$i"; fi
    mount --bind "$1" "$stage/$i"
    mount -o remount,bind,ro,nosuid,nodev "$stage/$i"
    shift; i=$((i + 1))
  done
fi
exec "$@"
"""


@dataclass(frozen=True)
class Privilege:
    """Who the sandbox runs as. ``drop`` is (uid, gid) when the service is root."""

    drop: tuple[int, int] | None = None
    setpriv: str = "setpriv"
    unshare: str = "unshare"
    stage_dir: Path | None = None  # mount point for staged binds (only with ``drop``)

    @property
    def owner(self) -> tuple[int, int]:
        """The uid/gid that owns the sandbox's files (the service's own without a drop)."""
        return self.drop if self.drop is not None else (os.getuid(), os.getgid())

    def describe(self) -> str:
        """How sandboxes get their uid, for the startup log and ``--check``."""
        if self.drop is not None:
            uid, gid = self.drop
            return f"uid {uid}, gid {gid}: dropped from root with setpriv before bwrap"
        if os.geteuid() == 0:
            return "uid 0 outside: the service is root and no privilege drop is in force"
        return f"uid {os.getuid()}: the service's own user"


def prefix(privilege: Privilege, cgroup_procs: tuple[Path, ...], staged: list[str]) -> list[str]:
    """The argv in front of bwrap (or of prlimit in ``none`` mode)."""
    stage = privilege.stage_dir if privilege.drop is not None else None
    sources = staged if stage is not None else []
    argv = [
        "/bin/sh",
        "-c",
        LAUNCHER_SCRIPT,
        "modbox-launch",
        str(len(cgroup_procs)),
        *(str(p) for p in cgroup_procs),
        str(stage) if stage is not None else "",
        str(len(sources)),
        *sources,
    ]
    if stage is not None:
        argv = [privilege.unshare, "--mount", "--propagation", "private", "--", *argv]
    if privilege.drop is not None:
        uid, gid = privilege.drop
        argv += [privilege.setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]
    return argv


def staged_path(privilege: Privilege, index: int, source: str) -> str:
    """Where bwrap finds the ``index``-th staged source (the source itself if unstaged)."""
    if privilege.drop is None or privilege.stage_dir is None:
        return source
    return str(privilege.stage_dir / str(index))


def data_fd(name: str, data: bytes) -> int:
    """A fresh memfd holding ``data`` at offset 0, for one bwrap to read and close
    (``--seccomp``, ``--ro-bind-data``); ``pass_fds`` hands it over.

    A fresh one per start: bwrap reads the fd to its end, and two sandboxes starting at
    once must not share a file offset.
    """
    fd = os.memfd_create(f"modbox-{name}", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
    except OSError:
        os.close(fd)
        raise
    return fd
