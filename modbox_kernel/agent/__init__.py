"""Kernel-side helpers for the in-sandbox agent (the package ``inside/`` in this folder).

The session's bootstrap (``modbox_kernel/bootstrap.py``) imports this module to get the
agent artifact for upload, the exec command that starts it, and the bash line for each
request, exactly as ``docs/agent-protocol.md`` specifies. Stdlib only; nothing here
runs inside the sandbox (``inside/`` does, and imports nothing from the package).

The artifact is one zip file (a zipapp: a top-level ``__main__.py`` plus the package
as ``modbox_agent/``), built in memory from ``inside/`` by :func:`build_agent`. It is
built deterministically (sorted names, fixed timestamps and modes, stored without
compression, since zlib is optional in some CPython builds), so the same sources
always give the same bytes, and their hash is the agent's version.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
import pathlib
import shlex
import zipfile
from typing import Any

__all__ = [
    "AGENT_VERSION",
    "INLINE_LIMIT",
    "SOURCE_DIR",
    "UNREACHABLE_EXIT",
    "agent_artifact",
    "agent_file_name",
    "build_agent",
    "encode_request",
    "request_command",
    "start_command",
]

#: The agent's source package, as installed with modbox_kernel.
SOURCE_DIR: pathlib.Path = pathlib.Path(__file__).with_name("inside")

#: The package's name inside the zip (its code uses relative imports only).
ARCHIVE_PACKAGE = "modbox_agent"

#: The zip's entry point: ``python3 <file>.pyz start --state-dir DIR``. It calls main()
#: from the script itself, not during an import (the daemon runs inside that call).
ARCHIVE_MAIN = (
    '"""Entry point of the Modbox agent zip (see modbox_agent/__init__.py)."""\n'
    "import sys\n"
    f"from {ARCHIVE_PACKAGE}.daemon import main\n"
    "sys.exit(main())\n"
)

#: Above this many base64 characters the session uploads the request and passes ``ref``.
INLINE_LIMIT: int = 64 * 1024

#: Exit status of a request command when the agent cannot be reached.
UNREACHABLE_EXIT = 97

# 1980-01-01, the earliest time a zip entry can carry: the same bytes on every build.
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)


def build_agent(source: pathlib.Path = SOURCE_DIR) -> bytes:
    """The zip of the agent's package: identical bytes for identical sources."""
    members = {"__main__.py": ARCHIVE_MAIN.encode("utf-8")}
    for path in source.rglob("*.py"):
        if "__pycache__" in path.parts:
            continue
        name = f"{ARCHIVE_PACKAGE}/{path.relative_to(source).as_posix()}"
        members[name] = path.read_bytes()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name in sorted(members):
            info = zipfile.ZipInfo(name, date_time=_FIXED_TIME)
            info.external_attr = 0o644 << 16
            info.create_system = 3  # unix, whatever machine builds it
            archive.writestr(info, members[name])
    return buffer.getvalue()


@functools.lru_cache(maxsize=1)
def agent_artifact() -> bytes:
    """The bytes to upload as :func:`agent_file_name` (built once per process)."""
    return build_agent()


#: Short hash of the artifact: a changed agent gets a new upload name. The running
#: agent reports the same value as ``agent_version`` in its start line and ``info``.
AGENT_VERSION: str = hashlib.sha256(agent_artifact()).hexdigest()[:12]


def agent_file_name() -> str:
    """The artifact's file name in the sandbox."""
    return f"modbox-agent-{AGENT_VERSION}.pyz"


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
    passed through :func:`encode_request` (the channel measures it first, so it need
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
        f" && printf '%s %s\\n' \"$T\" {shlex.quote(body)} >&3 && exec cat <&3"
        f" || {{ echo 'modbox-agent: unreachable' >&2; exit {UNREACHABLE_EXIT}; }}"
    )
