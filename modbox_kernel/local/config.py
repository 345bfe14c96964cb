"""Settings of the embedded service, resolved once at startup.

``__main__`` builds a :class:`ServiceConfig` from the command line and environment;
every other module receives it and only reads it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

MIB = 1024 * 1024
GIB = 1024 * MIB

# The uid (and gid) sandboxes run as, outside and inside the jail, when the service
# runs as root. Not 65534 (nobody): other daemons run as nobody, and anything of the
# same uid on the host could signal or trace sandbox processes. Debian allocates
# 60000-64999 only on demand, so 64000 is normally free; override it where it is not.
DEFAULT_SANDBOX_UID = 64000


@dataclass(frozen=True)
class Limits:
    """Per-sandbox, per-request and per-host limits.

    Defaults are a classroom starting point, loosened where the notebook workloads we
    target (pip, pandas, matplotlib) need room (``docs/isolation.md``, "Default limits").
    """

    exec_timeout_default: float = 300.0  # wall time of one exec
    exec_timeout_max: float = 24 * 3600.0
    output_cap: int = 16 * MIB  # per stream, per exec
    exec_body_max: int = 16 * MIB
    json_body_max: int = 1 * MIB
    upload_max: int = 50 * 1000 * 1000  # "50 MB" as the Modbox docs say
    upload_count_max: int = 10_000  # files in uploads/ before uploads are refused
    download_max: int = 1 * GIB  # largest file the files API hands out
    list_max: int = 10_000  # entries in one directory listing
    tmp_size: int = 512 * MIB  # tmpfs /tmp and /dev/shm, each (RAM, counts as memory)
    workspace_size: int = 1 * GIB  # tmpfs /workspace under bwrap (RAM, counts as memory)
    memory: int = 2 * GIB  # cgroup memory limit (where cgroups are writable)
    # What admission counts each sandbox at (a request, as Kubernetes has; admission).
    memory_request: int = 512 * MIB
    address_space: int = 16 * GIB  # RLIMIT_AS fallback when no memory cgroup is usable
    # Hard CPU quota in CPUs (cgroup). Off by default: each sandbox is its own cpu cgroup
    # of equal weight anyway (fair share), and a quota costs interactive latency.
    cpus: float = 0.0
    cpu_time: int = 0  # RLIMIT_CPU seconds per process; 0 = off (the agent is long-lived)
    nproc: int = 512  # cgroup pids.max and RLIMIT_NPROC (processes and threads)
    nofile: int = 4096  # RLIMIT_NOFILE
    fsize: int = 1 * GIB  # RLIMIT_FSIZE: largest file a sandbox process may write
    max_sandboxes: int = 64  # live sandboxes at once (admission)
    # Live sandboxes one owner credential may hold (``owners``); 0 = no cap.
    max_sandboxes_per_owner: int = 4
    max_total_memory: int = 64 * 512 * MIB  # sum of live sandboxes' memory requests
    ttl_default: int = 3600
    ttl_min: int = 60
    ttl_max: int = 86400
    # A sandbox whose lease is renewed (an extension the kernel opts into) is destroyed
    # once renewals stop for this long: its kernel died without shutting down. Longer
    # than the kernel's 30 s of transport retries, so a kernel that rides out a network
    # fault keeps its sandbox; short enough that a dead kernel's is gone within a
    # minute. 0 = off.
    lease_seconds: float = 50.0


@dataclass(frozen=True)
class Role:
    """What an owner credential naming this role gets instead of the defaults
    (``--role NAME:memory=MIB,sandboxes=N``)."""

    # The hard memory limit of each of its sandboxes (bytes), and the live sandboxes one
    # owner in this role may hold (0: no cap); None: the service's own.
    memory: int | None = None
    max_sandboxes: int | None = None


@dataclass(frozen=True)
class ServiceConfig:
    """Everything the service needs to know, fixed for its lifetime."""

    host: str
    port: int
    token: str
    state_dir: Path
    isolation: str  # the *requested* mode: auto | bwrap | none
    require_isolation: bool
    network: bool  # True shares the host network with sandboxes (off by default)
    limits: Limits = field(default_factory=Limits)
    bwrap: str | None = None  # explicit bwrap executable (default: found on PATH)
    sandbox_uid: int = DEFAULT_SANDBOX_UID  # used only when the service runs as root
    sandbox_gid: int = DEFAULT_SANDBOX_UID
    roles: dict[str, Role] = field(default_factory=dict)  # owner credentials' roles


def parse_role(text: str) -> tuple[str, Role]:
    """``NAME:memory=MIB,sandboxes=N`` as (name, Role); a part left out stays the
    service's own. ValueError with a sentence when malformed."""
    name, _, spec = text.partition(":")
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", name):
        raise ValueError(f"{text!r}: a role is NAME:memory=MIB,sandboxes=N")
    values: dict[str, int | None] = {"memory": None, "sandboxes": None}
    for part in filter(None, spec.split(",")):
        key, _, value = part.partition("=")
        if key not in values or not value.strip().isdigit():
            raise ValueError(f"{text!r}: expected memory=MIB and/or sandboxes=N after the name")
        values[key] = int(value)
    memory = values["memory"]
    if memory is not None and memory < 64:
        raise ValueError(f"{text!r}: a role's memory must be at least 64 MiB")
    return name, Role(
        memory=None if memory is None else memory * MIB, max_sandboxes=values["sandboxes"]
    )
