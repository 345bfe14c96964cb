"""``usage_request``: the sandbox's resource figures, in the fields frontends read.

JupyterLab's resource panel (jupyter-resource-usage) asks the kernel for
``usage_request`` and reads ``kernel_cpu`` (percent, 100 = one CPU), ``kernel_memory``
(bytes), ``cpu_count``, ``host_cpu_percent`` and ``host_virtual_memory``. The stock
kernel measures its own process tree; here the user's code runs in the sandbox, so the
figures are the sandbox's, read inside it (``agent/inside/resources.py``). The
"host" fields describe the sandbox too (its memory limit is its total), because that
is the machine the notebook runs on. ``modbox`` adds the sandbox's id and limits.

Who calls what, and when: ``ModboxKernel.usage_request`` (control thread) runs
:func:`usage_reply` on the main loop for each request.
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING, Any

from .agent.inside import protocol as names
from .errors import ModboxError

if TYPE_CHECKING:
    from .session import SandboxSession


async def usage_reply(session: SandboxSession) -> dict[str, Any]:
    """The ``usage_reply`` content; without a sandbox, only what needs none."""
    content: dict[str, Any] = {"hostname": socket.gethostname(), "pid": os.getpid()}
    if not session.ready:
        content["cpu_count"] = os.cpu_count()
        content["modbox"] = {"sandbox_id": None, "state": "no sandbox yet"}
        return content
    try:
        figures = await session.query(names.OP_USAGE)
    except ModboxError as exc:
        content["modbox"] = {"sandbox_id": None, "state": f"unavailable: {exc}"}
        return content
    used = int(figures.get("memory_bytes") or 0)
    limit = figures.get("memory_limit_bytes")
    cpus = figures.get("cpu_count") or 1
    percent = float(figures.get("cpu_percent") or 0.0)
    content.update(
        kernel_cpu=percent,
        kernel_memory=used,
        cpu_count=cpus,
        host_cpu_percent=round(percent / float(cpus), 1),
    )
    if isinstance(limit, int) and limit > 0:
        free = max(0, limit - used)
        content["host_virtual_memory"] = {
            "total": limit,
            "available": free,
            "percent": round(100.0 * used / limit, 1),
            "used": used,
            "free": free,
        }
    content["modbox"] = {
        "sandbox_id": session.sandbox_id,
        "memory_bytes": used,
        "memory_limit_bytes": limit,
        "memory_source": figures.get("memory_source"),
        "cpu_seconds": figures.get("cpu_seconds"),
        "processes": figures.get("processes"),
    }
    return content
