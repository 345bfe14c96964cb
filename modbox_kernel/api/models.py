"""Plain records parsed from Modbox JSON: :class:`SandboxInfo` and :class:`ExecResult`.

:class:`~modbox_kernel.api.client.ModboxClient` builds a ``SandboxInfo`` from every
control-plane answer (create, get, list); the session keeps the create-time record
and folds later ones into it with :meth:`SandboxInfo.merged`, because Modbox returns
``endpoint.access_token`` only once. :class:`~modbox_kernel.api.runtime.SandboxRuntime`
returns an ``ExecResult`` per exec.

Secrets: ``access_token`` and ``raw`` (which holds the create answer's ``endpoint``)
are excluded from ``repr`` so that logging a record can never print a credential.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ExecResult", "SandboxInfo"]


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


@dataclass(frozen=True)
class SandboxInfo:
    """What the control plane told us about one sandbox.

    ``id`` is the canonical ``sandbox_id``; ``name`` is the caller's ``task_id``;
    ``status`` is ``provisioning`` / ``running`` / ``destroyed`` (unknown strings are
    kept as they come). ``sandbox_url`` and ``capabilities`` stay empty until the
    sandbox runs; ``access_token`` and ``api_url`` come only from the create answer.
    """

    id: str
    name: str | None = None
    status: str | None = None
    sandbox_url: str | None = None
    api_url: str | None = None
    access_token: str | None = field(default=None, repr=False)
    capabilities: dict[str, str] = field(default_factory=dict)
    expires_at: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, data: dict[str, Any], *, name: str | None = None) -> SandboxInfo:
        """Parse a ProvisionResponse, SandboxDetail or SandboxListItem.

        The three shapes differ (``sandbox_id`` vs ``id``, ``endpoint`` only on
        create), so every field is optional except an id. ``name`` fills in the
        ``task_id`` the caller sent, which a create answer does not echo.
        """
        sandbox_id = _str_or_none(data.get("sandbox_id")) or _str_or_none(data.get("id"))
        if sandbox_id is None:
            raise ValueError("the answer carries no sandbox id")
        endpoint = data.get("endpoint")
        endpoint = endpoint if isinstance(endpoint, dict) else {}
        caps = data.get("capabilities")
        capabilities = (
            {k: v for k, v in caps.items() if isinstance(k, str) and isinstance(v, str) and v}
            if isinstance(caps, dict)
            else {}
        )
        return cls(
            id=sandbox_id,
            name=_str_or_none(data.get("name")) or name,
            status=_str_or_none(data.get("status")),
            sandbox_url=_str_or_none(data.get("sandbox_url"))
            or _str_or_none(endpoint.get("base_url")),
            api_url=_str_or_none(endpoint.get("api_url")),
            access_token=_str_or_none(endpoint.get("access_token")),
            capabilities=capabilities,
            expires_at=_str_or_none(data.get("expires_at")),
            raw=dict(data),
        )

    def merged(self, newer: SandboxInfo) -> SandboxInfo:
        """``newer`` with the gaps filled from ``self``.

        Called with ``self`` = the create-time record and ``newer`` = a later GET: the
        detail has the current status and URL but never the ``access_token`` (nor,
        on older deployments, ``capabilities`` or ``api_url``), which only the create
        answer carried.
        """
        return dataclasses.replace(
            newer,
            name=newer.name or self.name,
            sandbox_url=newer.sandbox_url or self.sandbox_url,
            api_url=newer.api_url or self.api_url,
            access_token=newer.access_token or self.access_token,
            capabilities=newer.capabilities or dict(self.capabilities),
            expires_at=newer.expires_at or self.expires_at,
        )


@dataclass(frozen=True)
class ExecResult:
    """One finished exec: the wire's ``{exitCode, stdout, stderr, durationMs}``."""

    exit_code: int
    stdout: str
    stderr: str
    duration_ms: int
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExecResult:
        """Parse an exec answer; camelCase per the docs, snake_case tolerated.

        Raises ``ValueError`` when there is no integer exit code, since without one
        the caller cannot tell success from failure.
        """
        exit_code = data.get("exitCode", data.get("exit_code"))
        if isinstance(exit_code, bool) or not isinstance(exit_code, int):
            raise ValueError("the answer carries no integer exitCode")
        duration = data.get("durationMs", data.get("duration_ms", 0))
        stdout = data.get("stdout")
        stderr = data.get("stderr")
        return cls(
            exit_code=exit_code,
            stdout=stdout if isinstance(stdout, str) else "",
            stderr=stderr if isinstance(stderr, str) else "",
            duration_ms=int(duration) if isinstance(duration, (int, float)) else 0,
            raw=dict(data),
        )
