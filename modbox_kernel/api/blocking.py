"""A synchronous, never-raising destroy for interpreter-exit cleanup.

The session registers :func:`destroy_sandbox_blocking` with ``atexit``
(``docs/architecture.md``, "Nothing leaks"): at that point the event loop may be closed
or gone, so this is plain sync httpx with one short attempt. It is the fallback layer;
the TTL is the one after it.
"""

from __future__ import annotations

import logging
import time

import httpx

from .urls import check_base_url, redact_url, sandbox_path, tls_context_for, trust_env_for

__all__ = ["destroy_sandbox_blocking"]

logger = logging.getLogger("modbox_kernel.api")


def destroy_sandbox_blocking(
    base_url: str,
    token: str | None,
    sandbox_id: str,
    *,
    workspace_id: str | None = None,
    timeout: float = 2.0,
) -> bool:
    """``DELETE /sandboxes/{id}`` in one try bounded by ``timeout`` seconds.

    True when the service confirmed the destroy (or that it was already destroyed);
    False when it does not know the id, could not be reached, or failed. Never raises:
    it runs in ``atexit`` where an exception only produces noise.
    """
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if workspace_id:
        headers["x-workspace-id"] = workspace_id
    started = time.monotonic()
    try:
        base = check_base_url(base_url)
        with httpx.Client(
            base_url=base,
            timeout=timeout,
            headers=headers,
            trust_env=trust_env_for(base),
            verify=tls_context_for(base),
        ) as http:
            response = http.delete(sandbox_path(sandbox_id))
    except Exception as exc:  # atexit: report, never raise (see docstring)
        logger.warning(
            "could not destroy sandbox %s at %s: %s",
            sandbox_id,
            redact_url(base_url),
            type(exc).__name__,
        )
        return False
    logger.debug(
        "DELETE %s -> %d in %.1f ms",
        sandbox_path(sandbox_id),
        response.status_code,
        (time.monotonic() - started) * 1000.0,
    )
    if not response.is_success:
        return False
    try:
        data = response.json()
    except ValueError:
        return True
    return not (isinstance(data, dict) and data.get("success") is False)
