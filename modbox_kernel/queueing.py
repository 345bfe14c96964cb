"""Waiting in line for a sandbox when Modbox is at capacity.

Who calls what, and when: the session (``session.py``) creates each sandbox through
:func:`create_in_line`. A 429 from the control plane (a full host, a rate limit) is not
a failure: the create is asked again, with the same ``Idempotency-Key`` (on the local
service that key is the place in line, first come, first served), until it is admitted
or the start's deadline (``MODBOX_STARTUP_TIMEOUT``) passes. Meanwhile ``on_wait`` gets
one line saying why the cell waits, with the place in line where the service says it
(the error's ``details``, an extension of the local service); the kernel shows it in
place of the "Starting a Modbox sandbox" progress line.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

from .api import ModboxClient, SandboxInfo
from .errors import ProvisioningError, RateLimitedError

# How often a waiting create asks again: as the service's Retry-After says, within
# these bounds (the local service keeps a place while its holder asks every second).
MIN_PAUSE_S = 0.5
MAX_PAUSE_S = 5.0


async def create_in_line(
    client: ModboxClient,
    *,
    key: str,
    deadline: float,
    on_wait: Callable[[str | None], None],
    timeout_setting: float,
    **create: Any,
) -> SandboxInfo:
    """``client.create_sandbox(**create)``, asked again at capacity until ``deadline``.

    ``key`` is the create's Idempotency-Key and so its place in line: the caller keeps
    it until a sandbox was made, across waits that ran out, so that running the cell
    again resumes the same place rather than queueing behind it. ``deadline`` is a
    ``time.monotonic()`` value; ``timeout_setting`` is the configured startup timeout,
    named in the sentence when the wait runs out. ``on_wait`` gets the reason while
    waiting and None once the sandbox is admitted (or the wait ends).
    """
    try:
        while True:
            try:
                return await client.create_sandbox(
                    idempotency_key=key, wait_at_capacity=False, **create
                )
            except RateLimitedError as exc:
                pause = min(max(exc.retry_after or 1.0, MIN_PAUSE_S), MAX_PAUSE_S)
                if time.monotonic() + pause >= deadline:
                    raise ProvisioningError(
                        f"no Modbox sandbox became free within {timeout_setting:.0f} s: "
                        f"{waiting_reason(exc)}",
                        hint="raise MODBOX_STARTUP_TIMEOUT to wait longer, or run the cell "
                        "again when fewer sandboxes are in use",
                    ) from exc
                on_wait(waiting_reason(exc))
                await asyncio.sleep(pause)
    finally:
        on_wait(None)


def new_key() -> str:
    """A fresh Idempotency-Key, for the next sandbox a session creates."""
    return str(uuid.uuid4())


def waiting_reason(exc: RateLimitedError) -> str:
    """The service's sentence without its trailing period, and the place in line."""
    reason = (exc.service_message or exc.message).rstrip(".")
    for detail in exc.details:
        place, length = detail.get("queue_position"), detail.get("queue_length")
        if isinstance(place, int) and "in line" not in reason:
            of = f" of {length}" if isinstance(length, int) else ""
            reason = f"{reason}; you are number {place}{of} in line"
    return reason
