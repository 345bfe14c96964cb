"""Why a sandbox stopped answering, in one clause for the cell's error.

The session calls :func:`diagnose_loss` when its agent became unreachable or the
runtime answered 404, before it forgets the sandbox: the control plane's record says
whether the sandbox was destroyed (and, from the local service, why: out of memory, a
process limit, the TTL) or still runs with a dead agent.
"""

from __future__ import annotations

import asyncio
import time

from .api import ModboxClient
from .errors import ModboxError, NotFoundError


async def diagnose_loss(client: ModboxClient, sandbox_id: str, wait: float) -> str:
    """The cause, asked of ``client``; waits up to ``wait`` s for the service to know."""
    # The agent can die a moment before the service records why (an OOM kill, a
    # process limit); give it a short while to say so.
    deadline = time.monotonic() + wait
    while True:
        try:
            detail = await client.get_sandbox(sandbox_id)
        except NotFoundError:
            return "the sandbox no longer exists (destroyed or expired)"
        except ModboxError:
            return "the sandbox stopped answering"
        if detail.status == "destroyed":
            # The service may say why (out of memory, process limit, TTL, deleted).
            reason = detail.raw.get("error")
            if isinstance(reason, str) and reason.strip():
                return f"the sandbox was destroyed: {reason.strip().rstrip('.')}"
            return "the sandbox was destroyed (it may have reached its TTL or been deleted)"
        if time.monotonic() >= deadline:
            return "the Python process in the sandbox died (killed, or out of memory)"
        await asyncio.sleep(0.2)
