"""The per-sandbox runtime API: exec and files, under ``{sandbox_url}/modbox/api``.

Who calls it: ``app.build_app`` mounts :data:`routes`; callers are the kernel's
``api`` client and tests. Auth is the sandbox's own ``access_token`` or its creator's
``SANDBOX_API_KEY`` (see ``auth``). Exec is relayed to the sandbox's supervisor by
``registry.Registry.exec``; file routes act on the workspace through ``files`` (in a
worker thread, never following links the sandbox planted).

Files routes (documented in docs/local-service.md): ``POST files/upload`` (multipart
``file``) → ``uploads/<basename>``; ``GET files?path=`` lists a directory;
``GET files/download?path=`` streams a regular file; ``DELETE files?path=`` removes a
file, link or empty directory. Paths are workspace-relative or absolute under the
workspace path the sandbox sees. Each request borrows its own duplicate of the
workspace fd, and the worker thread that uses it closes it (``_in_workspace``):
closing it from the request would race a thread still running after a disconnect.
A download's own file fd is closed by its response however the stream ends, a client
hanging up midway included (``_FileResponse``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar
from urllib.parse import quote

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from . import files
from .auth import require_token
from .bodies import limited, opt_number, opt_str, read_json_object
from .envelope import ServiceError, validation_error
from .jailprocess import JailGone
from .registry import DESTROYED, PROVISIONING, Sandbox, gone
from .state import ServiceState, service

log = logging.getLogger(__name__)

PREFIX = "/sandboxes/{sandbox_id}/runtime/modbox/api"
MULTIPART_OVERHEAD = 1024 * 1024  # boundaries and part headers around the file

T = TypeVar("T")


def _sandbox(request: Request) -> tuple[ServiceState, Sandbox]:
    state = service(request)
    sandbox = state.registry.get(request.path_params["sandbox_id"])
    require_token(request, sandbox.access_token, sandbox.api_key)
    return state, sandbox


def _borrow_workspace(state: ServiceState, sandbox: Sandbox) -> files.Workspace:
    """A Workspace holding a fresh duplicate of the sandbox's workspace fd."""
    if sandbox.status == PROVISIONING:
        raise ServiceError(
            409, "sandbox_not_ready", "The sandbox is still provisioning.", retryable=True
        )
    if sandbox.status == DESTROYED or sandbox.jail is None:
        raise gone(sandbox)
    try:
        fd = sandbox.jail.workspace_fd()
    except JailGone:
        raise gone(sandbox) from None
    return files.Workspace(fd, sandbox.workspace_path, owner=state.registry.jail.privilege.drop)


async def _in_workspace(
    state: ServiceState, sandbox: Sandbox, func: Callable[..., T], *args: Any
) -> T:
    """Run ``func(workspace, *args)`` in a worker thread that owns the borrowed fd."""
    ws = _borrow_workspace(state, sandbox)
    lock = threading.Lock()
    claimed = {"thread": False, "request": False}

    def run() -> T:
        with lock:
            if claimed["request"]:
                raise asyncio.CancelledError  # the request gave up before we started
            claimed["thread"] = True
        try:
            with files.acting_as(ws.owner):
                return func(ws, *args)
        finally:
            os.close(ws.root_fd)

    try:
        return await asyncio.to_thread(run)
    except asyncio.CancelledError:
        with lock:  # the thread never started: the fd is ours to close
            if not claimed["thread"]:
                claimed["request"] = True
                os.close(ws.root_fd)
        raise


async def exec_command(request: Request) -> JSONResponse:
    state, sandbox = _sandbox(request)
    limits = state.config.limits
    body = await read_json_object(request, limits.exec_body_max)
    command = opt_str(body, "command", limits.exec_body_max, min_len=0)
    if command is None:
        raise validation_error("body.command", "is required")
    if "\0" in command:
        raise validation_error("body.command", "contains a NUL byte")
    timeout = opt_number(body, "timeout", 0, limits.exec_timeout_max)
    log.debug("exec in %s: %r", sandbox.id, command[:200])
    result = await state.registry.exec(
        sandbox, command, timeout if timeout is not None else limits.exec_timeout_default
    )
    return JSONResponse(result)


async def ask_agent(request: Request) -> Response:
    """An extension: one request to the kernel's agent without a bash per request.

    Body ``{"state_dir", "request", "timeout"?}``, where ``request`` is what the bash
    request line of ``docs/agent-protocol.md`` would send after the token (base64 JSON,
    or ``@path`` of an uploaded request). The answer is the agent's own line, as is;
    409 ``agent_unreachable`` when no agent listens there. Advertised as
    ``capabilities.agent``; a kernel that does not see it sends the bash line by exec.
    """
    state, sandbox = _sandbox(request)
    limits = state.config.limits
    body = await read_json_object(request, limits.exec_body_max)
    state_dir = opt_str(body, "state_dir", 4096)
    payload = opt_str(body, "request", limits.exec_body_max)
    if state_dir is None or payload is None:
        raise validation_error("body", "needs state_dir and request")
    if "\n" in payload or "\0" in payload:
        raise validation_error("body.request", "is one line without NUL bytes")
    timeout = opt_number(body, "timeout", 0, limits.exec_timeout_max)
    if timeout is not None and timeout <= 0:
        raise validation_error("body.timeout", "must be greater than 0")
    timeout = timeout if timeout is not None else limits.exec_timeout_default
    answer = await state.registry.ask_agent(sandbox, state_dir, payload, timeout)
    if answer.get("spawnError") == "process_limit":
        raise ServiceError(
            503,
            "upstream_error",
            "The sandbox is at its process limit: its supervisor cannot take the request.",
            retryable=True,
        )
    if not answer.get("reached"):
        raise ServiceError(
            409,
            "agent_unreachable",
            f"No agent answers in {state_dir}: {answer.get('error')}",
            retryable=False,
        )
    if answer.get("error"):
        raise ServiceError(500, "internal_error", str(answer["error"]), retryable=False)
    if answer.get("timedOut"):
        raise ServiceError(504, "upstream_error", f"The agent did not answer within {timeout:g} s.")
    return Response(answer.get("payload") or b"", media_type="application/json")


async def upload(request: Request) -> JSONResponse:
    state, sandbox = _sandbox(request)
    limits = state.config.limits
    limit = limits.upload_max
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise validation_error("body", "must be multipart/form-data with a 'file' field")
    os.close(_borrow_workspace(state, sandbox).root_fd)  # 404/409 before reading 50 MB
    form = await limited(request, limit + MULTIPART_OVERHEAD).form(max_files=1, max_fields=16)
    try:
        item = form.get("file")
        if not isinstance(item, UploadFile):
            raise validation_error("body.file", "is required (a file part named 'file')")
        name = files.upload_name(item.filename)
        answer = await _in_workspace(
            state, sandbox, files.store_upload, name, item.file, limit, limits.upload_count_max
        )
    finally:
        await form.close()
    return JSONResponse(answer)


async def list_files(request: Request) -> JSONResponse:
    state, sandbox = _sandbox(request)
    parts = files.split_path(sandbox.workspace_path, request.query_params.get("path"))
    listing = await _in_workspace(
        state, sandbox, files.list_dir, parts, state.config.limits.list_max
    )
    return JSONResponse(listing)


def _required_path(request: Request, sandbox: Sandbox) -> list[str]:
    """The ``path`` query of download and delete, which (unlike a listing's) has no default."""
    path = request.query_params.get("path")
    if not path:
        raise validation_error("query.path", "is required")
    return files.split_path(sandbox.workspace_path, path)


async def download(request: Request) -> Response:
    state, sandbox = _sandbox(request)
    parts = _required_path(request, sandbox)
    fd, size = await _in_workspace(
        state, sandbox, files.open_file, parts, state.config.limits.download_max
    )
    filename = parts[-1]
    return _FileResponse(
        files.FileChunks(fd),
        media_type="application/octet-stream",
        headers={
            "Content-Length": str(size),
            "Content-Disposition": f"attachment; filename*=UTF-8''{quote(filename)}",
        },
    )


class _FileResponse(StreamingResponse):
    """Streams a :class:`files.FileChunks` and closes its fd however the stream ends.

    Starlette stops a streaming response when the client disconnects without closing
    its iterator, which would leave the fd open in the service (one per abandoned
    download, until the service runs out of them).
    """

    def __init__(self, chunks: files.FileChunks, **kwargs: Any) -> None:
        self.chunks = chunks
        super().__init__(self._stream(), **kwargs)

    async def _stream(self) -> AsyncIterator[bytes]:
        while chunk := await asyncio.to_thread(self.chunks.read):
            yield chunk

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # In a worker thread: the close waits for a read still in progress, and
            # the event loop must not. Nobody awaits it; the executor keeps it alive.
            asyncio.get_running_loop().run_in_executor(None, self.chunks.close)


async def delete_file(request: Request) -> JSONResponse:
    state, sandbox = _sandbox(request)
    parts = _required_path(request, sandbox)
    return JSONResponse(await _in_workspace(state, sandbox, files.delete, parts))


routes = [
    Route(f"{PREFIX}/exec", exec_command, methods=["POST"]),
    Route(f"{PREFIX}/agent", ask_agent, methods=["POST"]),
    Route(f"{PREFIX}/files/upload", upload, methods=["POST"]),
    Route(f"{PREFIX}/files/download", download, methods=["GET"]),
    Route(f"{PREFIX}/files", list_files, methods=["GET"]),
    Route(f"{PREFIX}/files", delete_file, methods=["DELETE"]),
]
