"""What the service records of one sandbox, and of a create request.

Who uses it: ``registry.Registry`` keeps one :class:`Sandbox` per sandbox it made (it
re-exports these names, which routes and shapes import from there); ``routes_control``
builds a :class:`ProvisionInput` from a validated create body.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .cgroups import SandboxCgroup
from .config import Limits
from .envelope import ServiceError
from .jailprocess import JailProcess
from .units import human_bytes

PROVISIONING, RUNNING, DESTROYED = "provisioning", "running", "destroyed"
STATUSES = (PROVISIONING, RUNNING, DESTROYED)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class ProvisionInput:
    """A validated create request (routes do the validation)."""

    name: str | None
    client_reference: str | None
    image: str
    env_vars: dict[str, str]
    ttl_seconds: int


@dataclass(eq=False)
class Sandbox:
    """One sandbox record. ``access_token`` is only ever sent in the create response."""

    id: str
    name: str
    image: str
    client_reference: str | None
    created_at: datetime
    expires_at: datetime
    access_token: str
    api_key: str | None  # env_vars["SANDBOX_API_KEY"], the docs' older runtime credential
    root: Path  # host dir holding the workspace
    workspace: Path  # host path of the workspace
    workspace_path: str  # the workspace as commands inside see it
    env_vars: dict[str, str]
    owner: str | None = None  # who created it (``owners``); None: the admin
    limits: Limits | None = None  # its owner's role's limits; None: the service's own
    created_mono: float = field(default_factory=time.monotonic)  # for sandbox-seconds
    status: str = PROVISIONING
    updated_at: datetime = field(default_factory=utcnow)
    destroyed_at: datetime | None = None
    error: str | None = None
    jail: JailProcess | None = None
    cgroup: SandboxCgroup | None = None
    settled: asyncio.Event = field(default_factory=asyncio.Event)  # left provisioning
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    start_task: asyncio.Task[None] | None = None
    torn_down: bool = False
    # A lease (an extension): once its holder renews it, the sandbox lives only while
    # renewals keep coming (``Registry.renew_lease``); 0 = no lease, the TTL alone.
    lease_seconds: float = 0.0
    lease_until: float = 0.0  # time.monotonic() the lease lapses at
    # Made in advance by the pool (``pool``): hidden from every query until a create
    # takes it over. ``agent`` says where the agent the pool started lives.
    pooled: bool = False
    agent: dict[str, str] | None = None

    def lease_lapsed(self, now: float | None = None) -> bool:
        """Whether this sandbox's holder stopped renewing its lease."""
        if not self.lease_seconds:
            return False
        return (time.monotonic() if now is None else now) > self.lease_until

    def set_status(self, status: str) -> None:
        self.status = status
        self.updated_at = utcnow()
        if status != PROVISIONING:
            self.settled.set()


def not_found(sandbox_id: str) -> ServiceError:
    return ServiceError(
        404, "sandbox_not_found", f"Sandbox {sandbox_id!r} does not exist.", retryable=False
    )


def gone(sandbox: Sandbox) -> ServiceError:
    why = f": {sandbox.error}" if sandbox.error else ""
    return ServiceError(
        404,
        "sandbox_not_found",
        f"Sandbox {sandbox.id} was destroyed{why}.",
        hint="Create a new sandbox.",
        retryable=False,
    )


def oom_reason(limits: Limits) -> str:
    return f"out of memory (limit {human_bytes(limits.memory)})"


def with_limit_event(result: dict[str, Any], fork_failures: int, limits: Limits) -> dict[str, Any]:
    """Name the limit an exec ran into: ``limitReached`` and a sentence on stderr."""
    if result.get("timedOut"):
        result["limitReached"] = "time_limit"
    elif fork_failures > 0:
        result["limitReached"] = "process_limit"
        stderr = str(result.get("stderr", ""))
        if stderr and not stderr.endswith("\n"):
            stderr += "\n"
        result["stderr"] = stderr + (
            f"modbox: the sandbox reached its process limit ({limits.nproc} processes and "
            f"threads); {fork_failures} fork attempts failed\n"
        )
    return result
