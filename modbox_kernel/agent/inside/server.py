"""The agent's servers: one request per connection, a line in, a line out.

``daemon.run_daemon`` starts :class:`Server` (TCP on 127.0.0.1: the bash request line
of ``docs/agent-protocol.md``) and, where it can bind one, :class:`UnixServer` (the
socket ``agent.sock`` in the state directory, which the local service connects to
without a process of the jail in between), each on a thread of its own. Each
connection is handled on a new thread by :class:`Handler`, which passes the line to
``ops.Requests.handle_line`` (which holds the agent's gate while it answers, so the
jedi warm-up steps aside meanwhile).
"""

from __future__ import annotations

import logging
import os
import socket
import socketserver
import threading
from typing import TYPE_CHECKING, Any, Dict

from .dapclient import untraced
from .wire import MAX_REQUEST_LINE, encode_answer

if TYPE_CHECKING:
    from .core import Agent
    from .ops import Requests

log = logging.getLogger("modbox.agent")

#: How often an idle server thread wakes (only to look for a shutdown nobody asks for).
IDLE_POLL_SECONDS = 3600.0


class Handler(socketserver.StreamRequestHandler):
    """One request: a line in, a line of ASCII JSON out, close."""

    timeout = 30.0
    server: Server

    def handle(self) -> None:
        line = self.rfile.readline(MAX_REQUEST_LINE + 1)
        exit_after = False
        try:
            if len(line) > MAX_REQUEST_LINE:
                resp: Dict[str, Any] = {"ok": False, "error": "request line too long"}
            else:
                resp = self.server.requests.handle_line(line)
            exit_after = bool(resp.pop("_then_exit", False))
        except Exception as exc:
            log.exception("request failed")
            resp = {"ok": False, "error": f"the agent could not handle the request: {exc}"}
        self.wfile.write(encode_answer(resp))
        self.wfile.flush()
        if exit_after:
            try:
                self.connection.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self.server.agent.exit_now()


class _Serving:
    """What both servers share: the agent, its requests, and how threads start."""

    agent: Agent
    requests: Requests
    process_request_thread: Any

    def process_request(self, request: Any, client_address: Any) -> None:
        # ThreadingMixIn's, with the thread marked as the debugger's own: a request
        # must be answered while a cell is stopped at a breakpoint.
        thread = threading.Thread(
            target=self.process_request_thread, args=(request, client_address), daemon=True
        )
        untraced(thread).start()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The default prints to sys.stderr, which is a cell's output here.
        log.exception("error while serving a request")


class Server(_Serving, socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, agent: Agent, requests: Requests) -> None:
        self.agent = agent
        self.requests = requests
        super().__init__(("127.0.0.1", 0), Handler)


class UnixServer(_Serving, socketserver.ThreadingUnixStreamServer):
    """The same requests on ``path``, bound under a temporary name and renamed into
    place, so a reader of the path never finds a socket nobody listens on yet."""

    daemon_threads = True
    request_queue_size = 64

    def __init__(self, agent: Agent, requests: Requests, path: str) -> None:
        self.agent = agent
        self.requests = requests
        directory, name = os.path.split(path)
        # A socket's path is at most 107 bytes; the directory's fd stands in for a
        # longer one (binding resolves the /proc link like any directory).
        self._dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        short = f"/proc/self/fd/{self._dir_fd}"
        temporary = f"{short}/.{name}.{os.getpid()}"
        try:
            os.unlink(temporary)
        except OSError:
            pass
        super().__init__(temporary, Handler)
        os.chmod(temporary, 0o600)
        self._temporary, self._path = temporary, f"{short}/{name}"

    def publish(self) -> None:
        """Put the socket at its path (once the token file it goes with is written)."""
        os.replace(self._temporary, self._path)


def serve_in_thread(server: socketserver.BaseServer, name: str) -> None:
    """Serve ``server`` for the agent's life on a thread of the debugger's own.

    Nothing stops these servers but the agent's exit, so the poll interval (how often
    ``serve_forever`` wakes to look for a shutdown request) is long: an idle agent
    does not wake for it.
    """
    untraced(
        threading.Thread(
            target=server.serve_forever, args=(IDLE_POLL_SECONDS,), name=name, daemon=True
        )
    ).start()
