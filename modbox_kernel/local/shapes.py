"""JSON bodies of the control plane, in the exact shapes of modbox-sdk 0.0.21.

Who calls it: ``routes_control``. The URL layout of a sandbox lives here too:
``sandbox_url = {base_url}/sandboxes/{id}/runtime``, the runtime API under
``{sandbox_url}/modbox/api`` (``…/exec``, ``…/files``, ``…/files/upload``), all
absolute, as ``endpoint`` and ``capabilities`` must be.
"""

from __future__ import annotations

import sys
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .config import Limits
from .registry import RUNNING, Sandbox

CREATED_BY = "local"


@dataclass(frozen=True)
class Image:
    """The one built-in image: the Python the service runs on."""

    id: str
    name: str
    image: str
    tag: str
    created_at: datetime


def builtin_image(created_at: datetime) -> Image:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    # A stable id (uuid5) so a caller may keep it across service restarts.
    return Image(
        id=str(uuid.uuid5(uuid.NAMESPACE_URL, "modbox-local:local-python")),
        name="local-python",
        image=f"local/python:{version}",
        tag=version,
        created_at=created_at,
    )


def image_detail(image: Image, limits: Limits) -> dict[str, Any]:
    return {
        "id": image.id,
        "name": image.name,
        "image": image.image,
        "tag": image.tag,
        "description": f"The service's own Python {sys.version.split()[0]} ({sys.executable}), "
        "read-only, with the packages installed beside it.",
        "enabled": True,
        "is_default": True,
        "memory_mb": limits.memory // (1024 * 1024),
        "readiness_port": None,
        "ttl_seconds": None,
        "created_at": _ts(image.created_at),
        "updated_at": _ts(image.created_at),
    }


def sandbox_url(base_url: str, sandbox: Sandbox) -> str:
    return f"{base_url}/sandboxes/{sandbox.id}/runtime"


def api_url(base_url: str, sandbox: Sandbox) -> str:
    return f"{sandbox_url(base_url, sandbox)}/modbox/api"


def capabilities(base_url: str, sandbox: Sandbox) -> dict[str, str]:
    api = api_url(base_url, sandbox)
    # ``agent`` is an extension (``routes_runtime.ask_agent``); Modbox has exec and files.
    return {"exec": f"{api}/exec", "files": f"{api}/files", "agent": f"{api}/agent"}


def provision_response(base_url: str, sandbox: Sandbox) -> dict[str, Any]:
    """The create answer; the only place ``access_token`` is ever sent."""
    return {
        "success": True,
        "sandbox_id": sandbox.id,
        "sandbox_url": None,  # null until running, as the SDK documents
        "status": sandbox.status,
        "endpoint": {
            "api_url": api_url(base_url, sandbox),
            "base_url": sandbox_url(base_url, sandbox),
            "access_token": sandbox.access_token,
        },
        "capabilities": capabilities(base_url, sandbox),
        "cache": {"requested": False, "status": "not_applicable"},
    }


def detail(base_url: str, sandbox: Sandbox) -> dict[str, Any]:
    running = sandbox.status == RUNNING
    return {
        "id": sandbox.id,
        "name": sandbox.name,
        "status": sandbox.status,
        "created_at": _ts(sandbox.created_at),
        "created_by": CREATED_BY,
        "updated_at": _ts(sandbox.updated_at),
        "destroyed_at": _ts(sandbox.destroyed_at),
        "expires_at": _ts(sandbox.expires_at),
        "image": sandbox.image,
        "sandbox_url": sandbox_url(base_url, sandbox) if running else None,
        "capabilities": capabilities(base_url, sandbox) if running else None,
        "client_reference": sandbox.client_reference,
        "error": sandbox.error,
        # An extension: the agent the pool started in this sandbox (``pool``).
        **({"agent": dict(sandbox.agent)} if running and sandbox.agent else {}),
    }


def list_item(base_url: str, sandbox: Sandbox) -> dict[str, Any]:
    return {
        "id": sandbox.id,
        "name": sandbox.name,
        "status": sandbox.status,
        "created_at": _ts(sandbox.created_at),
        "destroyed_at": _ts(sandbox.destroyed_at),
        "image": sandbox.image,
        "sandbox_url": sandbox_url(base_url, sandbox) if sandbox.status == RUNNING else None,
    }


def status_response(sandbox: Sandbox) -> dict[str, Any]:
    body: dict[str, Any] = {"ready": sandbox.status == RUNNING, "name": sandbox.name}
    if sandbox.error:
        body["error"] = sandbox.error
    return body


def _ts(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
