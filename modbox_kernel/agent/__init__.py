"""Kernel-side helpers for the in-sandbox agent (the package ``inside/`` in this folder).

The session's bootstrap (``modbox_kernel/bootstrap.py``) imports this module to get the
agent artifact for upload, the exec command that starts it, and the bash line for each
request, exactly as ``docs/agent-protocol.md`` specifies. Stdlib only; nothing here
runs inside the sandbox (``inside/`` does, and imports nothing from the package).

The artifact is one zip file (a zipapp: a top-level ``__main__.py`` plus the package
as ``modbox_agent/``), built in memory from ``inside/`` by :func:`build_agent`, with
bytecode for this Python beside it (``archive_main.py`` says why and how it is used).
It is built deterministically (sorted names, fixed timestamps and modes, stored
without compression, since zlib is optional in some CPython builds). The agent's
version is the hash of its sources alone, so a build with freshly compiled bytecode
and one that reused ``__pycache__`` name the same agent; the zip carries it as the
member ``modbox_agent/VERSION``.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.util
import io
import json
import marshal
import pathlib
import shlex
import sys
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
    "source_version",
    "start_command",
]

#: The agent's source package, as installed with modbox_kernel.
SOURCE_DIR: pathlib.Path = pathlib.Path(__file__).with_name("inside")

#: The package's name inside the zip (its code uses relative imports only).
ARCHIVE_PACKAGE = "modbox_agent"

#: The zip's entry point (its ``__main__.py``): the importer, then ``daemon.main``.
ARCHIVE_MAIN: str = pathlib.Path(__file__).with_name("archive_main.py").read_text("utf-8")

#: The member that names the agent's version (:data:`AGENT_VERSION`) inside the zip.
VERSION_MEMBER = f"{ARCHIVE_PACKAGE}/VERSION"

#: Above this many base64 characters the session uploads the request and passes ``ref``.
INLINE_LIMIT: int = 64 * 1024

#: Exit status of a request command when the agent cannot be reached.
UNREACHABLE_EXIT = 97

# 1980-01-01, the earliest time a zip entry can carry: the same bytes on every build.
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)


def _sources(source: pathlib.Path) -> dict[str, bytes]:
    """The zip's source members: its ``__main__.py`` and the package's modules."""
    members = {"__main__.py": ARCHIVE_MAIN.encode("utf-8")}
    for path in source.rglob("*.py"):
        if "__pycache__" in path.parts:
            continue
        members[f"{ARCHIVE_PACKAGE}/{path.relative_to(source).as_posix()}"] = path.read_bytes()
    return members


def source_version(members: dict[str, bytes]) -> str:
    """Short hash of the source members: the agent's version, whatever bytecode rides
    along (two builds of one source may differ in it, e.g. one with a stale cache)."""
    digest = hashlib.sha256()
    for name in sorted(members):
        digest.update(f"{name}\0{len(members[name])}\0".encode())
        digest.update(members[name])
    return digest.hexdigest()[:12]


def _bytecode(path: pathlib.Path, source: bytes) -> bytes:
    """The module's bytecode for this Python, as the zip's importer reads it.

    It comes from the ``__pycache__`` file that pip or ``make bytecode`` wrote when that
    file is still valid for ``source`` (a kernel start must not compile ~5,000 lines:
    that is the cost the bytecode exists to save), else from compiling here. The
    header is a standard one for hash-based bytecode that is not checked against its
    source (``archive_main.py``): the two are one immutable file.
    """
    code: bytes | None = None
    try:
        cached = pathlib.Path(importlib.util.cache_from_source(str(path))).read_bytes()
    except (OSError, NotImplementedError):
        cached = b""
    if len(cached) > 16 and cached[:4] == importlib.util.MAGIC_NUMBER:
        flags = int.from_bytes(cached[4:8], "little")
        if flags & 1:
            fresh = cached[8:16] == importlib.util.source_hash(source)
        else:
            stat = path.stat()
            fresh = (
                int.from_bytes(cached[8:12], "little") == int(stat.st_mtime) & 0xFFFFFFFF
                and int.from_bytes(cached[12:16], "little") == stat.st_size & 0xFFFFFFFF
            )
        if fresh:
            code = cached[16:]
    if code is None:
        code = marshal.dumps(compile(source, str(path), "exec", dont_inherit=True))
    header = importlib.util.MAGIC_NUMBER + (1).to_bytes(4, "little")
    return header + importlib.util.source_hash(source) + code


def build_agent(source: pathlib.Path = SOURCE_DIR) -> bytes:
    """The zip of the agent's package: its sources, their version, and this Python's
    bytecode for each module (``__pycache__/<module>.<tag>.pyc``)."""
    members = _sources(source)
    version = source_version(members)
    tag = sys.implementation.cache_tag  # None: this Python keeps no bytecode
    modules = [n for n in members if n.startswith(ARCHIVE_PACKAGE + "/")] if tag else []
    for name in modules:
        folder, _, module = name.rpartition("/")
        pyc = f"{folder}/__pycache__/{module[:-3]}.{tag}.pyc"
        members[pyc] = _bytecode(source / name[len(ARCHIVE_PACKAGE) + 1 :], members[name])
    members[VERSION_MEMBER] = version.encode("ascii")
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
    """The bytes to upload as :func:`agent_file_name` (built once per process, when
    first needed: a kernel that adopts a pooled agent never builds it)."""
    return build_agent()


#: Short hash of the agent's sources: a changed agent gets a new upload name. The
#: running agent reports the same value (the zip's ``VERSION`` member) as
#: ``agent_version`` in its start line and ``info``.
AGENT_VERSION: str = source_version(_sources(SOURCE_DIR))


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
