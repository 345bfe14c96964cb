"""The command line that starts one sandbox: launcher, bwrap (or nothing), prlimit, supervisor.

Who calls what: ``isolation.choose_jail`` picks a :class:`Jail` at startup (and probes
it); ``registry`` calls :meth:`Jail.launch` for every new sandbox and hands the
resulting :class:`Launch` to ``jailprocess.JailProcess``. Nothing here starts a process,
so the argv can be inspected in tests.

The bwrap shape (``docs/isolation.md``, "bwrap shape"): every namespace (user, pid, net,
ipc, uts, cgroup), no nested user namespaces, all capabilities dropped, a seccomp
deny-list (``seccomp``), a cleared environment, a read-only system (``/usr`` plus the
merged-usr symlinks and a few /etc files) and a read-only copy of *the service's own
Python* at the same paths, so that ``python3`` in the jail is this interpreter with
whatever is installed beside it. Writable, each a size-capped tmpfs private to the
sandbox (RAM that counts toward its memory cgroup): ``/workspace`` (cwd and HOME; its
size is the workspace quota), ``/tmp`` and ``/dev/shm``. Resource limits come from
``prlimit`` inside the jail (per-sandbox counting: ``docs/isolation.md``, "rlimits
inside the jail") and the cgroups the launcher joins; privileges are dropped by the
launcher (``launcher``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import launcher
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
# The account the sandbox's code runs as, in the passwd and group the jail is given
# (the host's account list stays outside): getpass.getuser(), whoami and "~" work.
SANDBOX_USER = "sandbox"

# Newer hardening (bwrap >= 0.8); used when present, logged when absent.
OPTIONAL_BWRAP_FLAGS = ("--disable-userns", "--assert-userns-disabled")

# /etc entries programs commonly need; bound read-only when they exist.
ETC_FILES = (
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "nsswitch.conf",
    "hosts",
    "localtime",
    "ssl",
    "ca-certificates",
    "alternatives",
    "mime.types",
    "fonts",
)


@dataclass(frozen=True)
class JailSpec:
    """What varies between sandboxes."""

    sandbox_id: str
    workspace: Path  # host directory of the workspace (``none`` mode only)
    limits: Limits
    network: bool = False
    cgroup_procs: tuple[Path, ...] = ()  # cgroup.procs files to join before bwrap runs
    address_space: int | None = None  # RLIMIT_AS, only when no memory cgroup is used


@dataclass
class Launch:
    """One sandbox start: argv, env and the fds the child inherits.

    ``channel`` is our end of a socketpair; the supervisor sends its workspace
    directory fd over it before saying hello (see ``jailprocess``). Call
    :meth:`close_child_fds` once the child is spawned (or failed to spawn).
    """

    argv: list[str]
    env: dict[str, str]
    pass_fds: tuple[int, ...]
    channel: socket.socket
    child_fds: list[int] = field(default_factory=list)

    def close_child_fds(self) -> None:
        for fd in self.child_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.child_fds = []

    def close(self) -> None:
        self.close_child_fds()
        self.channel.close()


@dataclass(frozen=True)
class Jail:
    """Base: a ``none``-mode jail (plain child process). :class:`BwrapJail` adds bwrap."""

    mode: str = "none"
    prlimit: str = field(default_factory=lambda: shutil.which("prlimit") or "/usr/bin/prlimit")
    privilege: launcher.Privilege = field(default_factory=launcher.Privilege)

    def workspace_path(self, spec: JailSpec) -> str:
        """The workspace path as commands inside the sandbox see it."""
        return str(spec.workspace)

    def env(self, spec: JailSpec) -> dict[str, str]:
        """The environment of the supervisor (the creator's env_vars come later, by frame).

        ``pip install`` goes to ``$HOME/.local`` (``PIP_PREFIX``), which ``PYTHONPATH``
        and ``PATH`` name: the sandbox's Python is a read-only venv whose user site is
        disabled, and a prefix install (unlike ``--target``) still sees the packages
        already installed beside the interpreter.
        """
        home = self.workspace_path(spec)
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        local = f"{home}/.local"
        env = {
            "PATH": f"{local}/bin:{os.path.dirname(sys.executable)}:/usr/local/bin:/usr/bin:/bin",
            "HOME": home,
            "LANG": "C.UTF-8",
            "OPENBLAS_NUM_THREADS": "1",
            "OMP_NUM_THREADS": "1",
            "PIP_PREFIX": local,
            "PYTHONPATH": f"{local}/lib/{version}/site-packages",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "MODBOX_SANDBOX_ID": spec.sandbox_id,
            "MODBOX_WORKSPACE": home,  # read and removed by the supervisor
        }
        if spec.cgroup_procs and spec.address_space is None:
            # The memory cgroup is the limit, but the jail cannot see it (no /sys): say it,
            # for the agent's usage figures (``agent/inside/resources.py``).
            env["MODBOX_MEMORY_LIMIT"] = str(spec.limits.memory)
        return env

    def launch(self, spec: JailSpec) -> Launch:
        """Create the per-start fds and the command line that uses them."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        child_fds = [theirs.detach()]
        try:
            seccomp_fd = self._seccomp_fd()
            if seccomp_fd is not None:
                child_fds.append(seccomp_fd)
            data_fds = self._data_fds(spec)
            child_fds.extend(data_fds.values())
            argv = self.argv(
                spec, channel_fd=child_fds[0], seccomp_fd=seccomp_fd, data_fds=data_fds
            )
        except BaseException:
            for fd in child_fds:
                os.close(fd)
            ours.close()
            raise
        return Launch(argv, self.env(spec), tuple(child_fds), ours, child_fds)

    def _seccomp_fd(self) -> int | None:
        return None

    def _data_fds(self, spec: JailSpec) -> dict[str, int]:
        """Files the jail is given as data (path inside → fd the child reads them from)."""
        return {}

    def argv(
        self,
        spec: JailSpec,
        channel_fd: int,
        seccomp_fd: int | None = None,
        data_fds: dict[str, int] | None = None,
    ) -> list[str]:
        return launcher.prefix(self.privilege, spec.cgroup_procs, []) + self._inner(
            spec, SUPERVISOR_SOURCE.as_posix(), channel_fd
        )

    def _inner(self, spec: JailSpec, supervisor: str, channel_fd: int) -> list[str]:
        lim = spec.limits
        rlimits = [
            f"--nproc={lim.nproc}:{lim.nproc}",
            f"--nofile={lim.nofile}:{lim.nofile}",
            f"--fsize={lim.fsize}:{lim.fsize}",
            "--core=0:0",
        ]
        if lim.cpu_time > 0:
            # hard = soft + 1: SIGXCPU first (catchable, a readable death), SIGKILL after.
            rlimits.append(f"--cpu={lim.cpu_time}:{lim.cpu_time + 1}")
        if spec.address_space:
            rlimits.append(f"--as={spec.address_space}:{spec.address_space}")
        # -I: ignore PYTHON* variables and user site; -S: no site import, the supervisor
        # is stdlib-only and starts faster without it.
        return [
            self.prlimit,
            *rlimits,
            "--",
            _python(),
            "-I",
            "-S",
            supervisor,
            "--channel-fd",
            str(channel_fd),
        ]


@dataclass(frozen=True)
class BwrapJail(Jail):
    """The bubblewrap jail. ``optional_flags`` are the optional flags this bwrap has."""

    mode: str = "bwrap"
    bwrap: str = "bwrap"
    optional_flags: frozenset[str] = frozenset(OPTIONAL_BWRAP_FLAGS)
    seccomp_program: bytes | None = None

    def workspace_path(self, spec: JailSpec) -> str:
        return JAIL_WORKSPACE

    def env(self, spec: JailSpec) -> dict[str, str]:
        env = super().env(spec)
        if not spec.network:
            # No network: let `pip install` fail at once instead of after 5 retries.
            env["PIP_RETRIES"] = "0"
        env["USER"] = env["LOGNAME"] = SANDBOX_USER if self.privilege.owner[0] else "root"
        return env

    def _seccomp_fd(self) -> int | None:
        if self.seccomp_program is None:
            return None
        return launcher.data_fd("seccomp", self.seccomp_program)

    def _data_fds(self, spec: JailSpec) -> dict[str, int]:
        uid, gid = self.privilege.owner
        return {
            "/etc/passwd": launcher.data_fd("passwd", passwd_text(uid, gid).encode()),
            "/etc/group": launcher.data_fd("group", group_text(gid).encode()),
        }

    def argv(
        self,
        spec: JailSpec,
        channel_fd: int,
        seccomp_fd: int | None = None,
        data_fds: dict[str, int] | None = None,
    ) -> list[str]:
        ro_sources = [*python_dirs(), str(SUPERVISOR_SOURCE)]
        data = [
            a for dest, fd in (data_fds or {}).items() for a in ("--ro-bind-data", str(fd), dest)
        ]
        return [
            *launcher.prefix(self.privilege, spec.cgroup_procs, ro_sources),
            self.bwrap,
            *self._namespace_flags(spec),
            *self._mounts(spec, ro_sources, data),
            *(["--seccomp", str(seccomp_fd)] if seccomp_fd is not None else []),
            "--clearenv",
            *[arg for k, v in self.env(spec).items() for arg in ("--setenv", k, v)],
            "--chdir",
            JAIL_WORKSPACE,
            "--",
            *self._inner(spec, JAIL_SUPERVISOR, channel_fd),
        ]

    def _namespace_flags(self, spec: JailSpec) -> list[str]:
        flags = ["--unshare-all", "--unshare-user"]
        if spec.network:
            flags.append("--share-net")
        # --disable-userns needs the explicit --unshare-user above (docs/isolation.md,
        # "bwrap shape").
        flags += [f for f in OPTIONAL_BWRAP_FLAGS if f in self.optional_flags]
        flags += ["--die-with-parent", "--new-session", "--cap-drop", "ALL"]
        flags += ["--hostname", JAIL_HOSTNAME]
        return flags

    def _mounts(self, spec: JailSpec, ro_sources: list[str], data: list[str]) -> list[str]:
        lim = spec.limits
        args = ["--ro-bind", "/usr", "/usr"]
        args += _root_links()
        for name in ETC_FILES:
            args += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
        if spec.network:
            args += ["--ro-bind-try", "/etc/resolv.conf", "/etc/resolv.conf"]
        args += ["--proc", "/proc", "--dev", "/dev"]
        tmp = str(lim.tmp_size)
        args += ["--size", tmp, "--tmpfs", "/tmp", "--size", tmp, "--tmpfs", "/dev/shm"]
        args += ["--dir", "/var", "--symlink", "../tmp", "/var/tmp"]
        for index, source in enumerate(ro_sources[:-1]):
            where = launcher.staged_path(self.privilege, index, source)
            args += ["--ro-bind", where, source]
        for link, target in python_links():
            args += ["--symlink", target, link]
        index = len(ro_sources) - 1
        supervisor = launcher.staged_path(self.privilege, index, ro_sources[-1])
        args += ["--ro-bind", supervisor, JAIL_SUPERVISOR]
        # The workspace is a tmpfs of its own: its size is the workspace quota, its
        # pages count toward the sandbox's memory cgroup, and it dies with the jail.
        args += ["--size", str(lim.workspace_size), "--tmpfs", JAIL_WORKSPACE]
        args += ["--dir", f"{JAIL_WORKSPACE}/uploads"]
        args += data
        # Last: the jail's root is a tmpfs bwrap built; without this, /etc, /opt and /
        # itself would be writable (privately, but "read-only system" means read-only).
        args += ["--remount-ro", "/"]
        return args


def passwd_text(uid: int, gid: int) -> str:
    """The jail's /etc/passwd: root, the sandbox's user (home: the workspace), nobody."""
    lines = ["root:x:0:0:root:/root:/bin/bash"]
    if uid != 0:
        lines.append(f"{SANDBOX_USER}:x:{uid}:{gid}:Modbox sandbox:{JAIL_WORKSPACE}:/bin/bash")
    lines.append("nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin")
    return "\n".join(lines) + "\n"


def group_text(gid: int) -> str:
    lines = ["root:x:0:"]
    if gid != 0:
        lines.append(f"{SANDBOX_USER}:x:{gid}:")
    lines.append("nogroup:x:65534:")
    return "\n".join(lines) + "\n"


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


def python_dirs() -> list[str]:
    """Directories that make this interpreter and its packages work in the jail.

    ``sys.prefix`` (a venv) and ``sys.base_prefix`` (the installation it was made from)
    are bound read-only at their real paths. Paths under /usr are covered by the /usr
    bind, and nested ones by their parent.
    """
    dirs: list[str] = []
    for given in (sys.prefix, sys.base_prefix, os.path.dirname(sys.executable)):
        real = os.path.realpath(given)
        if real == "/usr" or real.startswith("/usr/") or any(_under(real, d) for d in dirs):
            continue
        dirs = [d for d in dirs if not _under(d, real)] + [real]
    return dirs


def python_links() -> list[tuple[str, str]]:
    """(link, target) for prefixes spelled through a symlink on the host."""
    links = []
    for given in (sys.prefix, sys.base_prefix):
        real = os.path.realpath(given)
        if given != real and not given.startswith("/usr/"):
            links.append((given, real))
    return links


def _under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")
