"""What the routes share: the one :class:`ServiceState` stored on ``app.state.service``.

``__main__`` builds it before the server starts and fills in ``base_url`` once the
listening socket is bound (the port may have been 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from starlette.requests import Request

from .config import ServiceConfig
from .registry import Registry
from .shapes import Image


@dataclass
class ServiceState:
    config: ServiceConfig
    registry: Registry
    isolation: str  # the mode in effect: "bwrap" | "none"
    limits_note: str  # how memory/pids are enforced, for /health and the log
    image: Image
    base_url: str = ""
    # Removed at shutdown, in the lifespan: uvicorn re-raises SIGTERM after serving, so
    # code after server.serve() never runs on a signal.
    remove_on_exit: list[Path] = field(default_factory=list)


def service(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.service
    return state
