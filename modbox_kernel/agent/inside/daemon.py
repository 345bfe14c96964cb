"""``start``: daemonize the agent, wait until it listens, print one JSON line.

The kernel's session runs ``python3 -u <agent>.pyz start --state-dir DIR`` through one
exec (the zip's ``__main__`` calls :func:`main`). :func:`cmd_start` stops an agent that
already owns DIR (a restart means a fresh namespace), double-forks, and relays the
daemon's first line; the daemon's body is :func:`run_daemon`, which never returns.
"""

from __future__ import annotations

import base64
import faulthandler
import json
import logging
import os
import select
import signal
import socket
import sys
import time
import traceback
from typing import Any, Dict, List, Optional

from . import location
from .core import Agent
from .ops import Requests
from .server import Server, UnixServer, serve_in_thread
from .state import LOG_NAME, SOCKET_NAME, unlink_state_files, write_private

#: How long ``start`` waits for the daemon to report that it listens.
START_TIMEOUT_SECONDS = 20.0

log = logging.getLogger("modbox.agent")


def _close_inherited_fds(keep: int) -> None:
    """Close what the exec gave us (its pipes, sockets): the daemon must not hold them.

    Listing /proc/self/fd costs one call per open fd; closerange up to the fd limit
    costs one per possible fd (a million, in some containers).
    """
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        os.closerange(3, keep)
        os.closerange(keep + 1, 65536)
        return
    for fd in fds:
        if fd > 2 and fd != keep:
            try:
                os.close(fd)
            except OSError:
                pass  # the fd of the listdir itself, already closed


def run_daemon(state_dir: str, ready_fd: int) -> None:
    """The daemon's body (grandchild of ``start``): serve until ``shutdown``."""
    _close_inherited_fds(keep=ready_fd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    log_fd = os.open(
        os.path.join(state_dir, LOG_NAME), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600
    )
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    log_stream = open(log_fd, "w", buffering=1, closefd=False)
    # A segfault in user C code kills the agent: leave the reason in the log.
    faulthandler.enable(file=log_stream)
    handler = logging.StreamHandler(log_stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.DEBUG if os.environ.get("MODBOX_AGENT_DEBUG") else logging.INFO)

    agent = Agent(state_dir, log_fd)
    signal.signal(signal.SIGINT, agent.on_sigint)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # Helper threads inherit a blocked SIGINT, so a SIGINT sent to the process is
    # delivered to the main thread and interrupts its blocking call.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    agent.io.install()
    server = Server(agent, Requests(agent))
    agent.port = server.server_address[1]
    serve_in_thread(server, "modbox-server")
    unix_server: Optional[UnixServer] = None
    try:
        unix_server = UnixServer(agent, Requests(agent), os.path.join(state_dir, SOCKET_NAME))
    except OSError as exc:  # the TCP server is enough; the service then uses it
        log.warning("no socket in the state directory (%s); serving on TCP only", exc)
    else:
        serve_in_thread(unix_server, "modbox-server-unix")
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    write_private(os.path.join(state_dir, "token"), agent.token + "\n")
    write_private(os.path.join(state_dir, "port"), f"{agent.port}\n")
    write_private(os.path.join(state_dir, "pid"), f"{os.getpid()}\n")
    if unix_server is not None:
        unix_server.publish()
    log.info("agent %s listening on 127.0.0.1:%d (pid %d)", agent.version, agent.port, os.getpid())
    os.write(ready_fd, (json.dumps(agent.info()) + "\n").encode())
    os.close(ready_fd)

    # The notebook's view of the process, not the agent's command line.
    sys.argv = [""]
    # Python put the zip first on sys.path; the notebook sees "" there instead, as
    # under ipykernel. Every agent module is imported by now (imported modules keep
    # their loader, so tracebacks still find their source).
    if sys.path and location.is_agent_file(sys.path[0] or "."):
        sys.path[0] = ""
    agent.setup_runner()
    agent.main_loop()


def _request(state_dir: str, payload: Dict[str, Any], timeout: float) -> Dict[str, Any]:
    """Talk to a running agent the way the bash line does (used by ``start``)."""
    with open(os.path.join(state_dir, "port")) as f:
        port = int(f.read().strip())
    with open(os.path.join(state_dir, "token")) as f:
        token = f.read().strip()
    body = base64.b64encode(json.dumps(payload).encode()).decode()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(f"{token} {body}\n".encode())
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    result: Dict[str, Any] = json.loads(b"".join(chunks).decode())
    return result


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive (it may be our own unreaped child in tests)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def _stop_existing(state_dir: str) -> None:
    """A (re)start means a fresh namespace: stop the agent that owns this dir."""
    try:
        with open(os.path.join(state_dir, "pid")) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return
    try:
        _request(state_dir, {"op": "shutdown"}, timeout=2.0)
    except (OSError, ValueError):
        pass
    deadline = time.monotonic() + 3.0
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    if _pid_alive(pid):
        # Only kill what is really an agent for this dir (the pid may have been reused).
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                mine = state_dir.encode() in f.read()
        except OSError:
            mine = False
        if mine:
            os.kill(pid, signal.SIGKILL)
    unlink_state_files(state_dir)


def _log_tail(state_dir: str) -> str:
    try:
        with open(os.path.join(state_dir, LOG_NAME), "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 2000))
            return f.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


def cmd_start(state_dir: str) -> int:
    """``start``: daemonize, wait until it listens, print one JSON line."""
    state_dir = os.path.abspath(state_dir)
    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        os.chmod(state_dir, 0o700)
        _stop_existing(state_dir)
    except OSError as exc:
        print(json.dumps({"ok": False, "error": f"cannot prepare {state_dir}: {exc}"}))
        return 1
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # first child: new session, then fork again so we are no leader
        os.close(r)
        os.setsid()
        if os.fork() != 0:
            os._exit(0)
        code = 0
        try:
            run_daemon(state_dir, w)
        except BaseException as exc:
            log.exception("the agent failed")
            traceback.print_exc()
            code = 1
            try:  # still starting: tell `start` why (after the ready line, fd w is closed)
                reason = f"The Modbox agent could not start: {type(exc).__name__}: {exc}"
                os.write(w, (json.dumps({"ok": False, "error": reason}) + "\n").encode())
            except OSError:
                pass
        os._exit(code)
    os.close(w)
    os.waitpid(pid, 0)
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    buf = b""
    while b"\n" not in buf:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        ready, _, _ = select.select([r], [], [], remaining)
        if not ready:
            break
        chunk = os.read(r, 65536)
        if not chunk:
            break
        buf += chunk
    os.close(r)
    if b"\n" in buf:
        line = buf.split(b"\n", 1)[0].decode()
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
        try:
            return 0 if json.loads(line).get("ok") else 1
        except (ValueError, AttributeError):
            return 1
    why = f"did not report within {START_TIMEOUT_SECONDS:.0f} s" if not buf else "failed"
    tail = _log_tail(state_dir)
    msg = f"The Modbox agent {why}; {state_dir}/agent.log says: {tail or '(nothing)'}"
    print(json.dumps({"ok": False, "error": msg}))
    return 1


def main(argv: Optional[List[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) == 3 and args[0] == "start" and args[1] == "--state-dir":
        code = cmd_start(args[2])
        # The exec that ran ``start`` ends only when this process does, and the
        # interpreter's teardown of what the agent imported (asyncio among it) took
        # 40-60 ms more after the line was out: every sandbox's start waited for it.
        # This process has nothing left to do (no atexit hook, no thread, its pipe
        # closed), so it ends as soon as its output is flushed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.stderr.write("usage: python3 modbox-agent.pyz start --state-dir DIR\n")
    return 2
