"""Settings of the embedded service, resolved once at startup.

``__main__`` builds a :class:`ServiceConfig` from the command line and environment;
every other module receives it and only reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

MIB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """Per-sandbox and per-request limits. Defaults follow reliability.md §8, loosened
    where the notebook workloads we target (pip, pandas, matplotlib) need room."""

    exec_timeout_default: float = 300.0
    exec_timeout_max: float = 24 * 3600.0
    output_cap: int = 16 * MIB  # per stream, per exec
    exec_body_max: int = 16 * MIB
    json_body_max: int = 1 * MIB
    upload_max: int = 50 * 1000 * 1000  # "50 MB" as the Modbox docs say
    tmp_size: int = 512 * MIB  # tmpfs /tmp and /dev/shm, each
    memory: int = 2048 * MIB  # cgroup memory limit (where cgroups are writable)
    address_space: int = 16 * 1024 * MIB  # RLIMIT_AS fallback when no cgroup is usable
    nproc: int = 512  # cgroup pids.max, and RLIMIT_NPROC (void for uid 0)
    nofile: int = 4096
    fsize: int = 4096 * MIB
    max_sandboxes: int = 64
    ttl_default: int = 3600
    ttl_min: int = 60
    ttl_max: int = 86400


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
