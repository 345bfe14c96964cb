"""Admission control: a cap on live sandboxes and on the memory they are counted at.

Who calls it: ``registry.Registry.create``, synchronously, before it registers a new
sandbox. Beyond a cap the answer is a 429 ``rate_limited`` envelope with a
``Retry-After`` header and a sentence the kernel can show as is ("the host is at
capacity: N sandboxes running; try again shortly").

Requests and limits, as Kubernetes schedules pods: each sandbox keeps a hard memory
limit (``Limits.memory``, a cgroup ceiling it can never pass), but admission counts it
at its *request* (``Limits.memory_request``, a quarter of the limit by default), since
most notebooks use a fraction of their ceiling; the budget of requests is the host's
RAM less a reserve for the service, Jupyter and the kernels (``docs/isolation.md``,
"Admission and capacity"). So 40 sandboxes of 2 GiB each are admitted on a 24 GiB host.
What keeps that honest is the host's *available* memory, read at each create: a host
that really is short admits nothing more, whatever the arithmetic says. Sandbox
processes carry ``oom_score_adj`` 1000, so if the host runs short anyway the kernel
kills inside a sandbox first, never the service or Jupyter.
"""

from __future__ import annotations

from .config import Limits
from .envelope import ServiceError
from .units import human_bytes
from .waitline import WaitLine

RETRY_AFTER_S = 5
# For a create that holds a place in line (see ``waitline``).
QUEUED_RETRY_AFTER_S = 1


def admit(
    live: int,
    limits: Limits,
    available: int | None = None,
    *,
    line: WaitLine | None = None,
    key: str | None = None,
) -> None:
    """Raise the 429 envelope when one more sandbox would pass a cap, or must wait.

    ``available`` is the host's available memory in bytes (None: not checked). With a
    ``line``, creates are served first come, first served: a create carrying ``key``
    (its ``Idempotency-Key``) that cannot be admitted takes a place in line and hears
    it, and while anyone waits, only the head of the line may pass.
    """
    why = capacity_reason(live, limits, available)
    if line is None:
        if why is not None:
            raise at_capacity(live, why)
        return
    ahead = line.ahead_of(key)
    if why is None and ahead == 0:
        line.leave(key)
        return
    full = why is not None
    if why is None:
        why = f"{ahead} earlier {'request waits' if ahead == 1 else 'requests wait'} for a sandbox"
    place = line.join(key)
    raise at_capacity(live, why, place=place, waiting=len(line), full=full)


def admit_owner(owner: str, live: int, limits: Limits, role: str | None = None) -> None:
    """Raise a 429 when ``owner`` already has as many live sandboxes as one may (in
    ``role``, whose cap ``limits`` then holds).

    Not a place in line: waiting would not free one of the owner's own sandboxes.
    """
    cap = limits.max_sandboxes_per_owner
    if cap and live >= cap:
        who = "one user" if role is None else f"one {role}"
        setting = "--max-sandboxes-per-owner" if role is None else f"--role {role}:sandboxes=N"
        raise ServiceError(
            429,
            "rate_limited",
            f"{owner} already has {live} {_noun(live)} running, the most {who} may "
            f"have at once ({cap}).",
            hint="Shut down a kernel you no longer use (each notebook's kernel has its own "
            f"sandbox); the service's operator sets the cap with {setting}.",
            retryable=False,
        )


def capacity_reason(live: int, limits: Limits, available: int | None) -> str | None:
    """Why one more sandbox cannot be admitted now, or None."""
    if live >= limits.max_sandboxes:
        cap = limits.max_sandboxes
        return f"at most {cap} {_noun(cap)} may run at once"
    request = memory_request(limits)
    if (live + 1) * request > limits.max_total_memory:
        ceiling = "" if request == limits.memory else f" (it may use {human_bytes(limits.memory)})"
        return (
            f"each sandbox is counted at {human_bytes(request)} of memory{ceiling} and this "
            f"host admits {human_bytes(limits.max_total_memory)} in total"
        )
    if available is not None and available < request:
        return (
            f"the host has only {human_bytes(available)} of memory available and each "
            f"sandbox is counted at {human_bytes(request)}"
        )
    return None


def memory_request(limits: Limits) -> int:
    """What one sandbox counts for in the budget: its request, never above its limit."""
    return min(limits.memory_request, limits.memory)


def host_memory_available() -> int | None:
    """``MemAvailable`` from /proc/meminfo in bytes, None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _noun(count: int) -> str:
    return "sandbox" if count == 1 else "sandboxes"


def at_capacity(
    live: int, why: str, *, place: int = 0, waiting: int = 0, full: bool = True
) -> ServiceError:
    """The 429 for a full host; with ``place`` (1 = next), where this create stands.

    ``full=False``: there is room, but earlier creates in line come first.
    """
    message = f"The host is at capacity: {live} {_noun(live)} running; try again shortly."
    details = None
    headers = {"Retry-After": str(RETRY_AFTER_S)}
    if place:
        state = (
            f"The host is at capacity: {live} {_noun(live)} running"
            if full
            else ("Earlier requests wait for a sandbox")
        )
        message = f"{state}; you are number {place} of {waiting} in line."
        details = [{"queue_position": place, "queue_length": waiting}]
        # Someone in line asks again soon: its place is kept while it does.
        headers = {"Retry-After": str(QUEUED_RETRY_AFTER_S)}
    return ServiceError(
        429,
        "rate_limited",
        message,
        hint=f"{why[0].upper()}{why[1:]}. Destroy sandboxes you no longer need.",
        details=details,
        retryable=True,
        headers=headers,
    )
