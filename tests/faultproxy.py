"""A small fault-injecting HTTP/1.1 proxy for tests (the fault scenarios of docs/isolation.md).

Who uses it: ``tests/test_kernel_faults.py`` puts it between a kernel and a dedicated
local Modbox service (started with ``--public-url <proxy url>``, so the runtime URLs the
service hands out point at the proxy too). The test thread configures it; the proxy
runs its own asyncio loop in a daemon thread.

It understands just enough HTTP/1.1 to act per request on a keep-alive connection
(request head, ``Content-Length`` or chunked bodies, responses likewise) and forwards
everything else byte for byte. For each request it asks ``decide(request)`` (set by the
test, called on the proxy thread) for a :class:`Fault`, or ``None`` to forward it
untouched:

* ``reset``: forward the request, read the whole response, then reset the client
  connection (TCP RST) without sending any of it: the request *did* reach the service;
* ``cut``: forward, then send half of the response and reset;
* ``stall``: forward, then hold the response for ``seconds`` before sending it (a
  client whose read timeout is shorter gives up and its connection is dropped);
* ``status``: answer with ``status`` (503 by default) and a Modbox error envelope
  without forwarding anything.

:meth:`FaultProxy.go_down` resets every open connection and stops listening (clients
get "connection refused"), :meth:`FaultProxy.come_back` listens again on the same port.

Bounds: bodies over ``max_body`` bytes end the connection; the proxy stops by itself
after ``max_lifetime`` seconds; :meth:`FaultProxy.close` (or the context manager) stops
it at once and resets its connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

MAX_HEAD = 64 * 1024


@dataclass(frozen=True)
class Fault:
    """What to do with one request: ``reset`` | ``cut`` | ``stall`` | ``status``."""

    kind: str
    seconds: float = 0.0  # stall
    status: int = 503  # status

    def __post_init__(self) -> None:
        if self.kind not in ("reset", "cut", "stall", "status"):
            raise ValueError(f"unknown fault {self.kind!r}")


@dataclass
class Request:
    """One parsed request, as ``decide`` sees it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    raw: bytes = field(repr=False)

    def json(self) -> object:
        return json.loads(self.body) if self.body else None


Decider = Callable[[Request], "Fault | None"]


class _Closed(Exception):
    """The peer closed the connection (cleanly) before a complete message."""


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str], limit: int) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        parts = []
        size_total = 0
        while True:
            line = await reader.readuntil(b"\r\n")
            size = int(line.split(b";")[0].strip() or b"0", 16)
            chunk = await reader.readexactly(size + 2)  # data + CRLF
            parts.append(line + chunk)
            size_total += size
            if size_total > limit:
                raise ValueError("body too large")
            if size == 0:
                # Trailers (rare) end with an empty line; chunk already held the CRLF.
                return b"".join(parts)
    length = int(headers.get("content-length", "0") or 0)
    if length > limit:
        raise ValueError("body too large")
    return await reader.readexactly(length) if length else b""


def _parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return lines[0], headers


async def _read_message(
    reader: asyncio.StreamReader, limit: int, *, response_to: str | None = None
) -> tuple[str, dict[str, str], bytes, bytes]:
    """(start line, headers, body, raw bytes) of one request or response."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        raise _Closed from exc
    start, headers = _parse_head(head)
    no_body = response_to == "HEAD" or (
        response_to is not None and start.split(" ")[1:2] in (["204"], ["304"])
    )
    if no_body:
        body = b""
    elif (
        response_to is not None
        and "content-length" not in headers
        and "chunked" not in headers.get("transfer-encoding", "").lower()
    ):
        body = await reader.read(limit + 1)  # delimited by the end of the connection
        if len(body) > limit:
            raise ValueError("body too large")
    else:
        body = await _read_body(reader, headers, limit)
    return start, headers, body, head + body


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST, as a crashed peer or a middlebox dropping state does."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def envelope(status: int) -> bytes:
    """An HTTP response carrying the Modbox error envelope (see docs/modbox-api.md)."""
    request_id = f"faultproxy-{uuid.uuid4().hex[:12]}"
    message = f"Injected by the test fault proxy: HTTP {status}."
    body = json.dumps(
        {
            "error": {
                "code": "service_unavailable" if status == 503 else "injected",
                "message": message,
                "request_id": request_id,
                "retryable": True,
            },
            "detail": message,
        }
    ).encode()
    reason = {502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}
    head = (
        f"HTTP/1.1 {status} {reason.get(status, 'Error')}\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        f"x-request-id: {request_id}\r\n"
        "\r\n"
    )
    return head.encode() + body


class FaultProxy:
    """The proxy. ``url`` is where clients connect; set ``upstream`` before traffic."""

    def __init__(
        self,
        upstream: tuple[str, int] | None = None,
        *,
        max_lifetime: float = 900.0,
        max_body: int = 64 * 1024 * 1024,
    ) -> None:
        self.upstream = upstream
        self.decide: Decider = lambda request: None
        self.max_body = max_body
        # What happened, for tests to assert that faults really were injected.
        self.injected: Counter[str] = Counter()
        self.forwarded = 0
        self._max_lifetime = max_lifetime
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port: int = sock.getsockname()[1]
        self._first_socket: socket.socket | None = sock
        self._thread = threading.Thread(target=self._run, name="faultproxy", daemon=True)
        ready = threading.Event()
        self._ready = ready
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the fault proxy did not start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ----------------------------------------------------------------- control (any thread)

    def go_down(self) -> None:
        """Reset every connection and stop listening: the service is unreachable."""
        asyncio.run_coroutine_threadsafe(self._go_down(), self._loop).result(10)

    def come_back(self) -> None:
        """Listen again on the same port."""
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)

    def close(self) -> None:
        if self._stopped.is_set():
            return
        with contextlib.suppress(RuntimeError):
            asyncio.run_coroutine_threadsafe(self._go_down(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._stopped.set()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def count(self, kind: str) -> None:
        with self._lock:
            self.injected[kind] += 1

    # ----------------------------------------------------------------- the proxy thread

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._listen())
        # Stops by itself: a test that forgets to close it cannot leave it running.
        self._loop.call_later(self._max_lifetime, self._loop.stop)
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            for writer in list(self._writers):
                writer.transport.abort()
            if self._server is not None:
                self._server.close()
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.close()
            self._stopped.set()

    async def _listen(self) -> None:
        if self._server is not None:
            return
        if self._first_socket is not None:
            sock, self._first_socket = self._first_socket, None
            self._server = await asyncio.start_server(self._serve, sock=sock, limit=MAX_HEAD)
        else:
            self._server = await asyncio.start_server(
                self._serve, "127.0.0.1", self.port, limit=MAX_HEAD, reuse_address=True
            )

    async def _go_down(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            _reset(writer)
        self._writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            if self.upstream is None:
                raise ConnectionError("no upstream configured")
            up_reader, upstream_writer = await asyncio.open_connection(
                *self.upstream, limit=MAX_HEAD
            )
            while True:
                start, headers, body, raw = await _read_message(reader, self.max_body)
                method, _, rest = start.partition(" ")
                request = Request(method, rest.rsplit(" ", 1)[0], headers, body, raw)
                try:
                    fault = self.decide(request)
                except Exception:  # a broken rule must not hang the client
                    fault = Fault("reset")
                if fault is not None and fault.kind == "status":
                    self.count("status")
                    writer.write(envelope(fault.status))
                    await writer.drain()
                    continue
                upstream_writer.write(raw)
                await upstream_writer.drain()
                _, _, _, response = await _read_message(
                    up_reader, self.max_body, response_to=method
                )
                self.forwarded += 1
                if fault is None:
                    writer.write(response)
                    await writer.drain()
                    continue
                self.count(fault.kind)
                if fault.kind == "reset":
                    _reset(writer)
                    return
                if fault.kind == "cut":
                    writer.write(response[: len(response) // 2])
                    await writer.drain()
                    _reset(writer)
                    return
                # stall. A client that gives up meanwhile closes its end: the read sees
                # EOF and the response is dropped. (HTTP/1.1 clients do not pipeline, so
                # nothing else arrives on this connection while it waits.)
                try:
                    await asyncio.wait_for(reader.read(1), timeout=fault.seconds)
                except asyncio.TimeoutError:
                    pass
                else:
                    return
                writer.write(response)
                await writer.drain()
        except (_Closed, ConnectionError, asyncio.IncompleteReadError, ValueError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            if upstream_writer is not None:
                upstream_writer.transport.abort()
            if not writer.transport.is_closing():
                writer.transport.abort()
