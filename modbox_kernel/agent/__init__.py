"""Kernel-side helpers for the in-sandbox agent (``agent.py`` in this folder).

The session (``modbox_kernel/session.py``) imports this module to get the agent's
source for upload, the exec command that starts it, and the bash line for each
request, exactly as ``docs/agent-protocol.md`` specifies. Stdlib only; nothing here
runs inside the sandbox (``agent.py`` does, and imports nothing from the package).
"""

from __future__ import annotations

import base64
import hashlib
import json
import pathlib
import shlex
from typing import Any

__all__ = [
    "AGENT_PATH",
    "AGENT_VERSION",
    "INLINE_LIMIT",
    "UNREACHABLE_EXIT",
    "agent_source",
    "encode_request",
    "request_command",
    "start_command",
]

#: The agent script as installed with the package.
AGENT_PATH: pathlib.Path = pathlib.Path(__file__).with_name("agent.py")

#: Above this many base64 characters the session uploads the request and passes ``ref``.
INLINE_LIMIT: int = 64 * 1024

#: Exit status of a request command when the agent cannot be reached.
UNREACHABLE_EXIT = 97


def agent_source() -> bytes:
    """The bytes to upload as ``modbox-agent-<AGENT_VERSION>.py``."""
    return AGENT_PATH.read_bytes()


#: Short hash of ``agent.py``: a changed agent gets a new upload name. The running
#: agent reports the same value as ``agent_version`` in its start line and ``info``.
AGENT_VERSION: str = hashlib.sha256(agent_source()).hexdigest()[:12]


def start_command(agent_file: str, state_dir: str, *, python: str = "python3") -> str:
    """The exec command that starts (or restarts) the agent and prints its JSON line."""
    q = shlex.quote
    return f"{q(python)} -u {q(agent_file)} start --state-dir {q(state_dir)}"


def encode_request(payload: dict[str, Any]) -> str:
    """Base64 of the UTF-8 JSON request: safe inside single quotes, no interpolation."""
    return base64.b64encode(json.dumps(payload, ensure_ascii=False).encode("utf-8")).decode("ascii")


def request_command(
    state_dir: str,
    payload: dict[str, Any] | None = None,
    *,
    ref: str | None = None,
    encoded: str | None = None,
) -> str:
    """The bash line of ``docs/agent-protocol.md`` for one request.

    Pass exactly one of: ``payload`` for an inline request, ``encoded`` for one already
    passed through :func:`encode_request` (the session measures it first, so it need
    not encode twice), or ``ref`` (the path of an uploaded request file) for a large
    one. The command prints the agent's one-line answer, or exits with
    :data:`UNREACHABLE_EXIT` when no agent listens.
    """
    if sum(x is not None for x in (payload, ref, encoded)) != 1:
        raise ValueError("pass exactly one of payload, encoded and ref")
    if payload is not None:
        body = encode_request(payload)
    elif encoded is not None:
        body = encoded
    else:
        body = f"@{ref}"
    return (
        f"cd {shlex.quote(state_dir)} 2>/dev/null && read -r P < port && read -r T < token"
        ' && exec 3<>"/dev/tcp/127.0.0.1/$P"'
        f" && printf '%s %s\\n' \"$T\" {shlex.quote(body)} >&3 && cat <&3"
        f" || {{ echo 'modbox-agent: unreachable' >&2; exit {UNREACHABLE_EXIT}; }}"
    )
