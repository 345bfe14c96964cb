"""Per-sandbox memory, pids and CPU limits through cgroups, where this host lets us write them.

Who calls what: ``__main__`` calls :func:`detect` once at startup and logs its
``description``; ``registry`` calls :meth:`CgroupManager.create` before starting a
sandbox (the jail launcher joins the returned ``procs_files``), reads
:meth:`SandboxCgroup.oom_kills` and :meth:`SandboxCgroup.pids_limit_hits` to name the
cause of a death or a failed fork, and calls :meth:`SandboxCgroup.kill_and_remove`
when destroying it.

Why: bwrap enforces no resource limits (``docs/isolation.md``, "Resource limits"),
RLIMIT_AS is per process and RLIMIT_NPROC is per uid, so a memory and a pids cgroup are
the only bound on one sandbox as a whole. Each sandbox gets a child of the cgroup the
service itself runs in (never one higher up: a sandbox must stay inside whatever limits
the service was given). cgroup v1 (separate ``memory``, ``pids`` and ``cpu``
hierarchies) and v2 (when the controllers can be enabled for our children) are
supported; with neither writable the service runs without and says so. With a writable
``cpu`` controller every sandbox is one scheduling entity of equal weight, so a sandbox
running 500 busy processes gets no more CPU than one running a single loop (fair share);
a hard quota (``--cpus``) is optional, because on a small host it costs interactive
latency (CFS throttling).

All functions are blocking file-system calls; callers run them in a worker thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PREFIX = "modbox-"


@dataclass(frozen=True)
class SandboxCgroup:
    """The cgroup directories of one sandbox (one per v1 hierarchy, or one v2 dir)."""

    dirs: tuple[Path, ...]
    memory_dir: Path | None = None
    pids_dir: Path | None = None
    v2: bool = False
    cpu_dir: Path | None = None  # where CPU time is accounted (cpuacct on v1, cpu.stat on v2)

    @property
    def procs_files(self) -> tuple[Path, ...]:
        return tuple(d / "cgroup.procs" for d in self.dirs)

    def pids(self) -> set[int]:
        found: set[int] = set()
        for procs in self.procs_files:
            with contextlib.suppress(OSError):
                found.update(int(x) for x in procs.read_text().split())
        return found

    def oom_kills(self) -> int:
        """Processes the kernel's OOM killer has killed in this sandbox so far."""
        if self.memory_dir is None:
            return 0
        # v1: memory.oom_control has "oom_kill N" (Linux >= 4.13); v2: memory.events.
        name = "memory.events" if self.v2 else "memory.oom_control"
        return _keyed_counter(self.memory_dir / name, "oom_kill")

    def cpu_seconds(self) -> float | None:
        """CPU time the sandbox's processes used so far (None: not accounted here)."""
        if self.cpu_dir is None:
            return None
        with contextlib.suppress(OSError, ValueError):
            if self.v2:
                usec = _keyed_counter(self.cpu_dir / "cpu.stat", "usage_usec")
                return usec / 1e6
            return int((self.cpu_dir / "cpuacct.usage").read_text()) / 1e9
        return None

    def peak_memory(self) -> int | None:
        """The most memory the sandbox held at once, in bytes (None: not known here)."""
        if self.memory_dir is None:
            return None
        name = "memory.peak" if self.v2 else "memory.max_usage_in_bytes"
        with contextlib.suppress(OSError, ValueError):
            return int((self.memory_dir / name).read_text())
        return None

    def pids_limit_hits(self) -> int:
        """fork()/clone() calls that failed because the sandbox hit pids.max."""
        if self.pids_dir is None:
            return 0
        return _keyed_counter(self.pids_dir / "pids.events", "max")

    def kill_and_remove(self, grace: float = 2.0) -> bool:
        """SIGKILL everything still in the cgroup, then remove it. True when removed."""
        deadline = time.monotonic() + grace
        for d in self.dirs:
            kill_file = d / "cgroup.kill"  # v2, Linux >= 5.14
            if kill_file.exists():
                with contextlib.suppress(OSError):
                    kill_file.write_text("1")
        while True:
            pids = self.pids()
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            removed = True
            for d in self.dirs:
                try:
                    d.rmdir()
                except FileNotFoundError:
                    pass
                except OSError:
                    removed = False  # EBUSY until the killed processes are reaped
            if removed:
                return True
            if time.monotonic() >= deadline:
                log.warning("cgroup %s still busy after %.1f s", self.dirs[0].name, grace)
                return False
            time.sleep(0.02)


@dataclass(frozen=True)
class CgroupManager:
    """Where sandbox cgroups are created and which limits they carry."""

    version: str  # "v1" | "v2" | "none"
    memory_base: Path | None
    pids_base: Path | None
    memory_limit: int
    pids_limit: int
    cpu_base: Path | None = None  # a cpu cgroup per sandbox: equal weight (fair share)
    cpus: float = 0.0  # CPU quota in CPUs on top of that; 0 = no quota
    # v1's cpuacct hierarchy when it is not mounted with cpu: CPU time per sandbox, for
    # the usage report (no limit is set there).
    cpuacct_base: Path | None = None

    @property
    def enforces_memory(self) -> bool:
        return self.memory_base is not None

    @property
    def enforces_cpu(self) -> bool:
        """A hard CPU quota is in force (not only the fair share)."""
        return self.cpu_base is not None and self.cpus > 0

    @property
    def description(self) -> str:
        if self.version == "none":
            return "no writable cgroup (memory bounded only by RLIMIT_AS per process)"
        parts = []
        if self.memory_base is not None:
            parts.append(f"memory {self.memory_limit // (1024 * 1024)} MiB")
        if self.pids_base is not None:
            parts.append(f"pids {self.pids_limit}")
        if self.enforces_cpu:
            parts.append(f"cpu {self.cpus:g} CPU")
        elif self.cpu_base is not None:
            parts.append("cpu fair share")
        return f"cgroup {self.version}: " + ", ".join(parts)

    def create(self, sandbox_id: str, memory: int | None = None) -> SandboxCgroup | None:
        """The sandbox's cgroups, with ``memory`` (bytes) as its limit instead of the
        service's (an owner role's)."""
        if self.version == "none":
            return None
        memory_limit = self.memory_limit if memory is None else memory
        name = f"{PREFIX}{os.getpid()}-{sandbox_id}"
        dirs: list[Path] = []
        memory_dir = pids_dir = cpu_dir = None
        try:
            if self.version == "v2":
                assert self.memory_base is not None
                d = self.memory_base / name
                d.mkdir()
                dirs.append(d)
                _write_v2_limits(d, memory_limit, self.pids_limit, self.cpus)
                memory_dir = pids_dir = cpu_dir = d
            else:
                if self.memory_base is not None:
                    memory_dir = self.memory_base / name
                    memory_dir.mkdir()
                    dirs.append(memory_dir)
                    _write_v1_memory(memory_dir, memory_limit)
                if self.pids_base is not None:
                    pids_dir = self.pids_base / name
                    pids_dir.mkdir()
                    dirs.append(pids_dir)
                    (pids_dir / "pids.max").write_text(str(self.pids_limit))
                if self.cpu_base is not None:
                    d = self.cpu_base / name
                    d.mkdir()
                    dirs.append(d)
                    _write_v1_cpu(d, self.cpus)
                    if (d / "cpuacct.usage").exists():  # cpu and cpuacct mounted together
                        cpu_dir = d
                if self.cpuacct_base is not None and cpu_dir is None:
                    try:
                        d = self.cpuacct_base / name
                        d.mkdir()
                        dirs.append(d)
                        cpu_dir = d
                    except OSError as exc:  # accounting only: never a reason to fail
                        log.debug("no cpuacct cgroup for sandbox %s: %s", sandbox_id, exc)
        except OSError as exc:
            log.warning("could not set up the cgroup of sandbox %s: %s", sandbox_id, exc)
            SandboxCgroup(tuple(dirs)).kill_and_remove(grace=0.5)
            return None
        return SandboxCgroup(
            tuple(dirs), memory_dir, pids_dir, v2=self.version == "v2", cpu_dir=cpu_dir
        )

    def reap_stale(self) -> None:
        """Remove sandbox cgroups left by a service that died (its pid is gone)."""
        bases = (self.memory_base, self.pids_base, self.cpu_base, self.cpuacct_base)
        for base in {b for b in bases if b is not None}:
            with contextlib.suppress(OSError):
                for child in base.iterdir():
                    owner = _owner_pid(child.name)
                    if owner is not None and not _alive(owner):
                        SandboxCgroup((child,)).kill_and_remove(grace=0.5)


def detect(memory_limit: int, pids_limit: int, cpus: float = 0.0) -> CgroupManager:
    """Find cgroup hierarchies we may create children in (tested with a probe child)."""
    none = CgroupManager("none", None, None, memory_limit, pids_limit)
    try:
        mounts = _cgroup_mounts()
        own = _own_cgroups()
    except OSError:
        return none
    memory_v1 = _v1_base(mounts, own, "memory")
    pids_v1 = _v1_base(mounts, own, "pids")
    cpu_v1 = _v1_base(mounts, own, "cpu")
    cpuacct_v1 = _v1_base(mounts, own, "cpuacct")
    if memory_v1 is not None or pids_v1 is not None:
        manager = CgroupManager(
            "v1", memory_v1, pids_v1, memory_limit, pids_limit, cpu_v1, cpus, cpuacct_v1
        )
        if _probe(manager):
            return manager
        if cpu_v1 is not None:  # the cpu hierarchy alone may be the problem
            manager = CgroupManager("v1", memory_v1, pids_v1, memory_limit, pids_limit)
            if _probe(manager):
                return manager
    v2 = _v2_base(mounts, own)
    if v2 is not None:
        v2_cpu = v2 if "cpu" in _v2_enabled(v2) else None
        manager = CgroupManager("v2", v2, v2, memory_limit, pids_limit, v2_cpu, cpus)
        if _probe(manager):
            return manager
    return none


def _probe(manager: CgroupManager) -> bool:
    cg = manager.create("probe")
    if cg is None:
        return False
    return cg.kill_and_remove(grace=0.5)


def _write_v1_memory(d: Path, limit: int) -> None:
    # memory.limit_in_bytes must be set before memsw (docs/isolation.md, "cgroups").
    (d / "memory.limit_in_bytes").write_text(str(limit))
    memsw = d / "memory.memsw.limit_in_bytes"
    if memsw.exists():
        with contextlib.suppress(OSError):
            memsw.write_text(str(limit))  # no swap beyond the memory limit


def _write_v1_cpu(d: Path, cpus: float) -> None:
    if cpus <= 0:
        return  # fair share only: the default cpu.shares, like every other sandbox
    period = 100_000
    (d / "cpu.cfs_period_us").write_text(str(period))
    (d / "cpu.cfs_quota_us").write_text(str(max(1000, int(cpus * period))))


def _write_v2_limits(d: Path, memory: int, pids: int, cpus: float) -> None:
    (d / "memory.max").write_text(str(memory))
    for name, value in (("memory.swap.max", "0"), ("memory.oom.group", "1")):
        with contextlib.suppress(OSError):
            (d / name).write_text(value)
    (d / "pids.max").write_text(str(pids))
    if cpus > 0 and (d / "cpu.max").exists():
        period = 100_000
        (d / "cpu.max").write_text(f"{max(1000, int(cpus * period))} {period}")


def _keyed_counter(path: Path, key: str) -> int:
    """The value of ``key N`` in a flat-keyed cgroup file (0 when absent or unreadable)."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def _v2_enabled(base: Path) -> set[str]:
    try:
        return set((base / "cgroup.subtree_control").read_text().split())
    except OSError:
        return set()


def _cgroup_mounts() -> list[tuple[str, str, str, set[str]]]:
    """(fstype, root, mountpoint, super options) of every cgroup mount."""
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            rfields = right.split()
            if len(fields) < 5 or len(rfields) < 3:
                continue
            fstype = rfields[0]
            if fstype in ("cgroup", "cgroup2"):
                opts = set(rfields[2].split(","))
                mounts.append((fstype, fields[3], fields[4], opts))
    return mounts


def _own_cgroups() -> dict[str, str]:
    """controller -> our path (key "" is the v2 path)."""
    own: dict[str, str] = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            parts = line.rstrip("\n").split(":", 2)
            if len(parts) != 3:
                continue
            for controller in parts[1].split(",") if parts[1] else [""]:
                own[controller] = parts[2]
    return own


def _join(mountpoint: str, root: str, own: str) -> Path:
    rel = own[len(root) :] if root != "/" and own.startswith(root) else own
    return Path(mountpoint) / rel.lstrip("/")


def _v1_base(
    mounts: list[tuple[str, str, str, set[str]]], own: dict[str, str], ctl: str
) -> Path | None:
    for fstype, root, mountpoint, opts in mounts:
        if fstype == "cgroup" and ctl in opts and ctl in own:
            base = _join(mountpoint, root, own[ctl])
            if os.access(base, os.W_OK):
                return base
    return None


def _v2_base(mounts: list[tuple[str, str, str, set[str]]], own: dict[str, str]) -> Path | None:
    if "" not in own:
        return None
    for fstype, root, mountpoint, _ in mounts:
        if fstype != "cgroup2":
            continue
        base = _join(mountpoint, root, own[""])
        try:
            controllers = set((base / "cgroup.controllers").read_text().split())
            if not {"memory", "pids"} <= controllers:
                continue
            enabled = set((base / "cgroup.subtree_control").read_text().split())
            if not {"memory", "pids"} <= enabled:
                # Fails with EBUSY while processes (we) live in base: the
                # "no internal processes" rule (docs/isolation.md, "cgroups").
                (base / "cgroup.subtree_control").write_text("+memory +pids")
            if "cpu" in controllers and "cpu" not in enabled:
                with contextlib.suppress(OSError):  # optional: a quota, not a safety bound
                    (base / "cgroup.subtree_control").write_text("+cpu")
            return base
        except OSError:
            continue
    return None


def _owner_pid(name: str) -> int | None:
    if not name.startswith(PREFIX):
        return None
    head = name[len(PREFIX) :].split("-", 1)[0]
    return int(head) if head.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
