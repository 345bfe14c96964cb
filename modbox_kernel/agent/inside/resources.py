"""The sandbox's resource figures, read from inside: memory, its limit, CPU, processes.

``ops.Requests.op_usage`` answers the kernel's ``usage_request`` with
:meth:`Resources.usage`; ``core.Agent`` wraps each cell in :meth:`Resources.cell` to
put its time, CPU and peak memory into the ``done`` event. Sources, in order: the
sandbox's cgroup (v2, then v1) where it is visible, else every process in ``/proc``
(a sandbox's own pid namespace shows only its processes). A cell's CPU is the agent's
own and that of the children it waited for (one ``times()`` call: every cell pays for
it). Peak memory during a cell is the largest of the readings at its end and every
:data:`SAMPLE_SECONDS` from :data:`FIRST_SAMPLE_SECONDS` on, taken by one thread that
looks once a second whether a cell runs (so a quick cell wakes no thread at all).
"""

from __future__ import annotations

import functools
import os
import resource
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from .dapclient import untraced

#: How often memory is sampled while a cell runs (its peak is the largest sample).
SAMPLE_SECONDS = 0.1
#: How often the sampling thread looks whether a cell runs (the first sample of a cell
#: comes within this long of its start).
FIRST_SAMPLE_SECONDS = 1.0
#: A cgroup limit at or above this means "no limit" (v1 writes a huge number).
_NO_LIMIT = 1 << 60

_PAGE = os.sysconf("SC_PAGE_SIZE")
_TICKS = os.sysconf("SC_CLK_TCK")


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _pids() -> List[str]:
    """The sandbox's processes: all of ``/proc`` in a sandbox's own pid namespace; where
    the host's processes show (no namespace), those carrying this sandbox's id."""
    try:
        pids = [name for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return [str(os.getpid())]
    marker = os.environ.get("MODBOX_SANDBOX_ID")
    if marker is None:
        return pids
    wanted = f"MODBOX_SANDBOX_ID={marker}".encode()
    if _own_namespace(wanted):
        return pids
    own = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if wanted in f.read().split(b"\0"):
                    own.append(pid)
        except OSError:
            continue
    return own or [str(os.getpid())]


@functools.lru_cache(maxsize=64)
def _own_namespace(wanted: bytes) -> bool:
    """Whether ``/proc`` is the sandbox's own pid namespace: its pid 1 (the jail's
    init) carries the sandbox's id, where a host's init never does."""
    environ = _read_bytes("/proc/1/environ")
    return environ is not None and wanted in environ.split(b"\0")


def _read_bytes(path: str) -> Optional[bytes]:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


@functools.lru_cache(maxsize=64)
def _cgroup_file(controller: str, name: str) -> Optional[str]:
    """``name`` in this process's own cgroup (``controller`` of v1, or "" for the v2
    hierarchy), when that is visible here (a jail shows no ``/sys``). Looked up once:
    every cell's end reads memory, and a process keeps its cgroup."""
    for line in (_read("/proc/self/cgroup") or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controller == "" and controllers == "":
            bases = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        elif controller and controller in controllers.split(","):
            bases = [f"/sys/fs/cgroup/{controllers}", f"/sys/fs/cgroup/{controller}"]
        else:
            continue
        for base in bases:
            candidate = os.path.join(base + path, name)
            if os.path.isfile(candidate):
                return candidate
    return None


def _cgroup_number(*places: Tuple[str, str]) -> Optional[int]:
    for controller, name in places:
        path = _cgroup_file(controller, name)
        text = (_read(path) or "").strip() if path else ""
        if text.isdigit():
            return int(text)
    return None


def memory_in_use() -> Tuple[int, str]:
    """Bytes in use by the sandbox, and where the figure comes from."""
    used = _cgroup_number(("", "memory.current"), ("memory", "memory.usage_in_bytes"))
    if used is not None:
        return used, "cgroup"
    total = 0
    for pid in _pids():
        fields = (_read(f"/proc/{pid}/statm") or "").split()
        if len(fields) > 1:
            total += int(fields[1]) * _PAGE
    return total, "processes"


def memory_limit() -> Optional[int]:
    """The sandbox's memory limit in bytes: its cgroup's, else the one the local service
    names (``MODBOX_MEMORY_LIMIT``, when the jail cannot see its cgroup), else the
    address-space limit, else the machine's memory."""
    limit = _cgroup_number(("", "memory.max"), ("memory", "memory.limit_in_bytes"))
    if limit is not None and limit < _NO_LIMIT:
        return limit
    named = os.environ.get("MODBOX_MEMORY_LIMIT", "")
    if named.isdigit():
        return int(named)
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        return int(soft)
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return None


def cpu_seconds() -> float:
    """CPU time the sandbox has used: its cgroup's, else the sum over its processes
    (each one's own time plus that of its children that have ended)."""
    path = _cgroup_file("", "cpu.stat")
    for line in (_read(path) or "").splitlines() if path else []:
        if line.startswith("usage_usec "):
            return int(line.split()[1]) / 1e6
    nanoseconds = _cgroup_number(("cpuacct", "cpuacct.usage"))
    if nanoseconds is not None:
        return nanoseconds / 1e9
    total = 0
    for pid in _pids():
        raw = _read(f"/proc/{pid}/stat")
        if not raw:
            continue
        fields = raw.rsplit(")", 1)[-1].split()
        # utime, stime, cutime, cstime: fields 14-17 of stat(5), 12-15 after the name.
        total += sum(int(x) for x in fields[11:15])
    return total / _TICKS


def cpu_count() -> float:
    """CPUs the sandbox may use: its cgroup quota, else its affinity mask."""
    path = _cgroup_file("", "cpu.max")
    text = (_read(path) or "").split() if path else []
    if len(text) == 2 and text[0].isdigit():
        return round(int(text[0]) / int(text[1]), 2)
    try:
        return float(len(os.sched_getaffinity(0)))
    except OSError:
        return float(os.cpu_count() or 1)


class Resources:
    """Figures for ``usage``, and per-cell time, CPU and peak memory."""

    def __init__(self) -> None:
        self._last: Optional[Tuple[float, float]] = None  # (monotonic, cpu seconds)
        self._cond = threading.Condition()
        self._sampling = False
        self._peak = 0
        self._sampler: Optional[threading.Thread] = None

    def usage(self) -> Dict[str, Any]:
        """The sandbox's figures now; ``cpu_percent`` is since the previous call (100 is
        one CPU; 0 at the first call, as psutil's ``cpu_percent``)."""
        now, cpu = time.monotonic(), cpu_seconds()
        percent = 0.0
        if self._last is not None and now > self._last[0]:
            percent = 100.0 * max(0.0, cpu - self._last[1]) / (now - self._last[0])
        self._last = (now, cpu)
        used, source = memory_in_use()
        return {
            "memory_bytes": used,
            "memory_source": source,
            "memory_limit_bytes": memory_limit(),
            "cpu_seconds": round(cpu, 3),
            "cpu_percent": round(percent, 1),
            "cpu_count": cpu_count(),
            "processes": len(_pids()),
        }

    # -- per cell (main thread)
    def cell_started(self) -> Tuple[float, float]:
        with self._cond:
            self._peak = 0
            self._sampling = True
            if self._sampler is None:
                self._sampler = untraced(
                    threading.Thread(target=self._sample, name="modbox-usage", daemon=True)
                )
                self._sampler.start()
        return time.monotonic(), _own_cpu()

    def cell_finished(self, started: Tuple[float, float]) -> Dict[str, Any]:
        used, _ = memory_in_use()
        with self._cond:
            self._sampling = False
            peak = max(self._peak, used)
        return {
            "seconds": round(time.monotonic() - started[0], 6),
            "cpu_seconds": round(max(0.0, _own_cpu() - started[1]), 3),
            "peak_memory_bytes": peak,
        }

    def _sample(self) -> None:
        while True:
            with self._cond:
                self._cond.wait(SAMPLE_SECONDS if self._sampling else FIRST_SAMPLE_SECONDS)
                if not self._sampling:
                    continue
            used, _ = memory_in_use()
            with self._cond:
                if self._sampling:
                    self._peak = max(self._peak, used)


def _own_cpu() -> float:
    """CPU seconds of this process and of its children it waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system
