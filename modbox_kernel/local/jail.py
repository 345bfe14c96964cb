"""The command line that starts one sandbox: bwrap (or nothing), prlimit, supervisor.

Who calls what: ``isolation.resolve_isolation`` picks a :class:`Jail` at startup (and
probes it); ``registry`` calls :meth:`Jail.argv` / :meth:`Jail.env` for every new
sandbox and hands the result to ``sandbox.JailProcess``. Nothing here starts a
process, so the argv can be unit-inspected.

The bwrap shape follows reliability.md §2.2: every namespace (user, pid, net, ipc,
uts, cgroup), no nested user namespaces, all capabilities dropped, a cleared
environment, a read-only system (``/usr`` plus the merged-usr symlinks and a few /etc
files) and a read-only copy of *the service's own Python* at the same paths, so that
``python3`` in the jail is this interpreter with whatever is installed beside it.
Writable: ``/workspace`` (cwd and HOME) and size-capped tmpfs ``/tmp`` and
``/dev/shm``. Resource limits come from ``prlimit`` inside the jail (per-sandbox
counting, §2.3) and, where writable, a cgroup the launcher joins before exec'ing bwrap.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .config import Limits

SUPERVISOR_SOURCE = Path(__file__).with_name("supervisor.py")
JAIL_SUPERVISOR = "/opt/modbox/supervisor.py"
JAIL_WORKSPACE = "/workspace"
JAIL_HOSTNAME = "modbox"

# Flags without which bwrap is not the jail we promise; probed in ``bwrap --help``.
REQUIRED_BWRAP_FLAGS = (
    "--unshare-all",
    "--unshare-user",
    "--die-with-parent",
    "--new-session",
    "--cap-drop",
    "--clearenv",
    "--size",
)
# Newer hardening (bwrap >= 0.8); used when present, logged when absent.
OPTIONAL_BWRAP_FLAGS = ("--disable-userns", "--assert-userns-disabled")

# /etc entries programs commonly need; bound read-only when they exist.
ETC_FILES = (
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "passwd",
    "group",
    "nsswitch.conf",
    "hosts",
    "localtime",
    "ssl",
    "ca-certificates",
    "alternatives",
    "mime.types",
    "fonts",
)

# The launcher moves itself into the sandbox's cgroups, then exec's bwrap in place:
# the pid stays the one our event-loop thread forked, so bwrap's --die-with-parent
# still watches the service (a forking wrapper would break that, §2.6). Its argv holds
# only paths the service generated, never anything a caller sent.
_CGROUP_LAUNCHER = (
    'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 125; shift; '
    'n=$((n - 1)); done; exec "$@"'
)


@dataclass(frozen=True)
class JailSpec:
    """What varies between sandboxes."""

    sandbox_id: str
    workspace: Path  # host directory that becomes the sandbox's workspace
    limits: Limits
    network: bool = False
    cgroup_procs: tuple[Path, ...] = ()  # cgroup.procs files to join before bwrap runs
    address_space: int | None = None  # RLIMIT_AS, only when no memory cgroup is used


@dataclass(frozen=True)
class Jail:
    """Base: a ``none``-mode jail (plain child process). :class:`BwrapJail` adds bwrap."""

    mode: str = "none"
    prlimit: str = field(default_factory=lambda: shutil.which("prlimit") or "/usr/bin/prlimit")

    def workspace_path(self, spec: JailSpec) -> str:
        """The workspace path as commands inside the sandbox see it."""
        return str(spec.workspace)

    def env(self, spec: JailSpec) -> dict[str, str]:
        """The environment of the supervisor (the creator's env_vars come later, by frame)."""
        home = self.workspace_path(spec)
        return {
            "PATH": f"{os.path.dirname(sys.executable)}:/usr/local/bin:/usr/bin:/bin",
            "HOME": home,
            "LANG": "C.UTF-8",
            "OPENBLAS_NUM_THREADS": "1",
            "OMP_NUM_THREADS": "1",
            "MODBOX_SANDBOX_ID": spec.sandbox_id,
            "MODBOX_WORKSPACE": home,  # read and removed by the supervisor
        }

    def argv(self, spec: JailSpec) -> list[str]:
        return self._launcher(spec) + self._inner(spec, SUPERVISOR_SOURCE.as_posix())

    def _launcher(self, spec: JailSpec) -> list[str]:
        if not spec.cgroup_procs:
            return []
        files = [str(p) for p in spec.cgroup_procs]
        return ["/bin/sh", "-c", _CGROUP_LAUNCHER, "modbox-launch", str(len(files)), *files]

    def _inner(self, spec: JailSpec, supervisor: str) -> list[str]:
        lim = spec.limits
        rlimits = [
            f"--nproc={lim.nproc}:{lim.nproc}",
            f"--nofile={lim.nofile}:{lim.nofile}",
            f"--fsize={lim.fsize}:{lim.fsize}",
            "--core=0:0",
        ]
        if spec.address_space:
            rlimits.append(f"--as={spec.address_space}:{spec.address_space}")
        # -I: ignore PYTHON* variables and user site; -S: no site import, the supervisor
        # is stdlib-only and starts faster without it.
        return [self.prlimit, *rlimits, "--", _python(), "-I", "-S", supervisor]


@dataclass(frozen=True)
class BwrapJail(Jail):
    """The bubblewrap jail. ``flags`` are the optional flags this bwrap supports."""

    mode: str = "bwrap"
    bwrap: str = "bwrap"
    optional_flags: frozenset[str] = frozenset(OPTIONAL_BWRAP_FLAGS)

    def workspace_path(self, spec: JailSpec) -> str:
        return JAIL_WORKSPACE

    def argv(self, spec: JailSpec) -> list[str]:
        return [
            *self._launcher(spec),
            self.bwrap,
            *self._namespace_flags(spec),
            *self._mounts(spec),
            "--clearenv",
            *[arg for k, v in self.env(spec).items() for arg in ("--setenv", k, v)],
            "--chdir",
            JAIL_WORKSPACE,
            "--",
            *self._inner(spec, JAIL_SUPERVISOR),
        ]

    def _namespace_flags(self, spec: JailSpec) -> list[str]:
        flags = ["--unshare-all", "--unshare-user"]
        if spec.network:
            flags.append("--share-net")
        # --disable-userns needs the explicit --unshare-user above (reliability.md §2.1).
        flags += [f for f in OPTIONAL_BWRAP_FLAGS if f in self.optional_flags]
        flags += ["--die-with-parent", "--new-session", "--cap-drop", "ALL"]
        flags += ["--hostname", JAIL_HOSTNAME]
        return flags

    def _mounts(self, spec: JailSpec) -> list[str]:
        tmp = str(spec.limits.tmp_size)
        args = ["--ro-bind", "/usr", "/usr"]
        args += _root_links()
        for name in ETC_FILES:
            args += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
        if spec.network:
            args += ["--ro-bind-try", "/etc/resolv.conf", "/etc/resolv.conf"]
        args += ["--proc", "/proc", "--dev", "/dev"]
        args += ["--size", tmp, "--tmpfs", "/tmp", "--size", tmp, "--tmpfs", "/dev/shm"]
        args += ["--dir", "/var", "--symlink", "../tmp", "/var/tmp"]
        args += python_binds()
        args += ["--ro-bind", str(SUPERVISOR_SOURCE), JAIL_SUPERVISOR]
        args += ["--bind", str(spec.workspace), JAIL_WORKSPACE]
        # Last: the jail's root is a tmpfs bwrap built; without this, /etc, /opt and /
        # itself would be writable (privately, but "read-only system" means read-only).
        args += ["--remount-ro", "/"]
        return args


def _python() -> str:
    """The interpreter that runs the supervisor (and is ``python3`` in the sandbox)."""
    return sys.executable or "python3"


def _root_links() -> list[str]:
    """Recreate /bin, /lib, … as the host has them: merged-usr symlinks or ro binds."""
    args: list[str] = []
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        host = Path("/") / name
        if host.is_symlink():
            args += ["--symlink", os.readlink(host), f"/{name}"]
        elif host.is_dir():
            args += ["--ro-bind", str(host), f"/{name}"]
    return args


def python_binds() -> list[str]:
    """Read-only binds that make this interpreter and its packages work in the jail.

    ``sys.prefix`` (a venv) and ``sys.base_prefix`` (the installation it was made from)
    are bound at their real paths; a symlinked spelling gets a symlink. Paths already
    under /usr are covered by the /usr bind. The host's /root is mode 700, but binding
    subpaths works because bwrap runs with the service's privileges.
    """
    args: list[str] = []
    seen: set[str] = set()
    for given in (sys.prefix, sys.base_prefix, os.path.dirname(sys.executable)):
        real = os.path.realpath(given)
        if real == "/usr" or real.startswith("/usr/") or any(_under(real, s) for s in seen):
            continue
        seen.add(real)
        args += ["--ro-bind", real, real]
    for given in (sys.prefix, sys.base_prefix):
        real = os.path.realpath(given)
        if given != real and not given.startswith("/usr/"):
            args += ["--symlink", real, given]
    return args


def _under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")
