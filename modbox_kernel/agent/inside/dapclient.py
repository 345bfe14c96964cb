"""One connection to debugpy's adapter: Debug Adapter Protocol frames both ways.

``debugging.Debugger`` opens a :class:`DapConnection` at each ``initialize`` and sends
requests on server threads; a reader thread of its own (marked as the debugger's, so a
breakpoint never stops it) hands responses to their waiters and events to
``on_event``. Frames are ``Content-Length: N\\r\\n\\r\\n`` plus N bytes of JSON.
:func:`response` and :func:`debug_info` shape the answers made without debugpy (the
kernel's ``debugger`` uses them too, before a sandbox exists).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional

from .naming import HASH_SEED

log = logging.getLogger("modbox.agent")

#: How long a request waits for its response, by default (below the kernel's 30 s for
#: one agent request, so the frontend hears this sentence, not a transport error).
RESPONSE_TIMEOUT = 20.0
#: Sequence numbers of the requests the agent makes itself (``threads`` after a stop,
#: ``evaluate`` for a rich inspection): far above any a frontend uses.
OWN_SEQ_START = 1_000_000_000


def untraced(thread: threading.Thread) -> threading.Thread:
    """Mark an agent thread as one the debugger neither traces nor suspends (the flags
    pydevd looks for, which ipykernel sets on its own threads)."""
    thread.pydev_do_not_trace = True  # type: ignore[attr-defined]
    thread.is_pydev_daemon_thread = True  # type: ignore[attr-defined]
    return thread


def response(request: Mapping[str, Any], success: bool = True, **fields: Any) -> Dict[str, Any]:
    """A DAP response to ``request`` made here (or by the kernel), not by debugpy."""
    reply = {
        "type": "response",
        "seq": request.get("seq", 0),
        "request_seq": request.get("seq", 0),
        "command": request.get("command"),
        "success": success,
    }
    reply.update(fields)
    return reply


def failed(request: Mapping[str, Any], message: str) -> Dict[str, Any]:
    """A DAP error response to ``request`` with ``message``."""
    return response(request, False, message=message)


def debug_info(
    request: Mapping[str, Any],
    *,
    started: bool,
    cell_prefix: str,
    breakpoints: Mapping[str, List[Dict[str, Any]]],
    stopped: Iterable[int],
) -> Dict[str, Any]:
    """Jupyter's ``debugInfo`` answer (ipykernel's fields): how cells are named (the
    agent's ``naming``), what is set and what is stopped."""
    body = {
        "isStarted": started,
        "hashMethod": "Murmur2",
        "hashSeed": HASH_SEED,
        "tmpFilePrefix": cell_prefix,
        "tmpFileSuffix": ".py",
        "breakpoints": [
            {"source": path, "breakpoints": points} for path, points in breakpoints.items()
        ],
        "stoppedThreads": sorted(set(stopped)),
        "richRendering": True,
        "exceptionPaths": ["Python Exceptions"],
        "copyToGlobals": True,
    }
    return response(request, body=body)


class DapConnection:
    """A DAP client connection; closed for good once either side closes it."""

    def __init__(
        self,
        endpoint: tuple[str, int],
        on_event: Callable[[Dict[str, Any]], None],
        on_close: Callable[[DapConnection], None],
    ) -> None:
        self._sock = socket.create_connection(endpoint, timeout=10.0)
        self._sock.settimeout(None)
        self._on_event = on_event
        self._on_close = on_close
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._responses: Dict[int, Dict[str, Any]] = {}
        self.initialized_seq: Optional[int] = None
        self.closed = False
        self._own_seq = OWN_SEQ_START
        untraced(threading.Thread(target=self._read, name="modbox-dap", daemon=True)).start()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()
        try:
            self._sock.close()
        except OSError:
            pass

    def send(self, request: Dict[str, Any]) -> Optional[str]:
        """Send ``request`` without waiting; a sentence when that failed."""
        body = json.dumps(request, ensure_ascii=False).encode("utf-8")
        seq = int(request.get("seq", 0))
        with self._cond:
            self._responses.pop(seq, None)
        try:
            with self._send_lock:
                self._sock.sendall(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        except OSError as exc:
            return f"the debugger's connection failed: {exc}"
        return None

    def response(
        self, request: Dict[str, Any], timeout: float = RESPONSE_TIMEOUT
    ) -> Dict[str, Any]:
        """Wait for the response to a request sent before."""
        seq = int(request.get("seq", 0))
        with self._cond:
            self._cond.wait_for(lambda: seq in self._responses or self.closed, timeout)
            if seq in self._responses:
                return self._responses.pop(seq)
        if self.closed:
            return failed(request, "the debugger's connection closed")
        return failed(request, "debugpy did not answer in time")

    def request(self, request: Dict[str, Any]) -> Dict[str, Any]:
        """Send ``request`` and wait for its response."""
        problem = self.send(request)
        return failed(request, problem) if problem else self.response(request)

    def own(self, command: str, **arguments: Any) -> Dict[str, Any]:
        """A request of the agent's own, with a sequence number of its own."""
        with self._cond:
            self._own_seq += 1
            seq = self._own_seq
        return self.request(
            {"type": "request", "seq": seq, "command": command, "arguments": arguments}
        )

    def wait_initialized(
        self, answered: Optional[Dict[str, Any]] = None, timeout: float = RESPONSE_TIMEOUT
    ) -> bool:
        """Wait for debugpy's ``initialized`` event (it comes after the first attach);
        also ends, True, when the ``answered`` request got its response instead or the
        connection closed. False after ``timeout``."""
        seq = None if answered is None else int(answered.get("seq", 0))
        with self._cond:
            return self._cond.wait_for(
                lambda: self.initialized_seq is not None or seq in self._responses or self.closed,
                timeout,
            )

    def _read(self) -> None:
        try:
            self._read_frames()
        except Exception:  # a malformed frame, a failing event handler
            log.exception("the debugger's connection failed")
        finally:
            self.close()
            self._on_close(self)

    def _read_frames(self) -> None:
        buffer = b""
        while True:
            try:
                data = self._sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                return
            buffer += data
            while True:
                head, sep, rest = buffer.partition(b"\r\n\r\n")
                if not sep:
                    break
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                if len(rest) < length:
                    break
                body, buffer = rest[:length], rest[length:]
                try:
                    message = json.loads(body)
                except ValueError:
                    log.warning("debugpy sent a frame that is not JSON")
                    continue
                self._dispatch(message)

    def _dispatch(self, message: Dict[str, Any]) -> None:
        if message.get("type") == "response":
            with self._cond:
                self._responses[int(message.get("request_seq", -1))] = message
                self._cond.notify_all()
        elif message.get("type") == "event":
            if message.get("event") == "initialized":
                with self._cond:
                    self.initialized_seq = int(message.get("seq", 0))
                    self._cond.notify_all()
            self._on_event(message)
