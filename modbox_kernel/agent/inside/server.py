"""The TCP server on 127.0.0.1: one request per connection, a line in, a line out.

``daemon.run_daemon`` starts :class:`Server` on a thread of its own; each connection is
handled on a new thread by :class:`Handler`, which passes the line to
``ops.Requests.handle_line`` (which holds the agent's gate while it answers, so the
jedi warm-up steps aside meanwhile).
"""

from __future__ import annotations

import logging
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


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, agent: Agent, requests: Requests) -> None:
        self.agent = agent
        self.requests = requests
        super().__init__(("127.0.0.1", 0), Handler)

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
