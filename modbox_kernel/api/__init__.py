"""The Modbox client: control plane (:class:`ModboxClient`) and runtime (:class:`SandboxRuntime`).

Used by ``modbox_kernel.session`` only; it speaks nothing but the documented Modbox
API (``docs/api-client.md`` summarises the behaviour, ``docs/modbox-api.md`` the API).
Failures are raised as :mod:`modbox_kernel.errors` classes whose ``str()`` is a
sentence for the user; no token ever appears in a message, ``repr`` or log line.
"""

from __future__ import annotations

from .blocking import destroy_sandbox_blocking
from .client import ModboxClient
from .http import RetryNotice
from .models import ExecResult, SandboxInfo
from .retry import RetryPolicy
from .runtime import SandboxRuntime

__all__ = [
    "ExecResult",
    "ModboxClient",
    "RetryNotice",
    "RetryPolicy",
    "SandboxInfo",
    "SandboxRuntime",
    "destroy_sandbox_blocking",
]
