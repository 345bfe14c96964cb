"""The process that lives inside one sandbox and runs its exec commands.

Who runs it: the local service (``modbox_kernel.local.jailprocess``) starts one per
sandbox, as the last link of ``bwrap … -- prlimit … -- python3 -I -S supervisor.py``
(or without bwrap in ``none`` mode). It is ro-bound into the jail at
``/opt/modbox/supervisor.py`` and must therefore use the standard library only and
import nothing from the package.

Protocol (stdin from the service, stdout to the service): frames of a 4-byte
big-endian length followed by that many bytes of UTF-8 JSON.

* First, with ``--channel-fd N`` (a unix socket the service passed down), it sends one
  fd of its workspace directory (SCM_RIGHTS) and closes the socket: under bwrap the
  workspace is a tmpfs that only exists inside the jail, and that fd is how the
  service's files API reaches it.
* Then the supervisor writes ``{"id": 0, "hello": true, "pid": N}``; the service
  marks the sandbox ``running`` when it sees it.
* ``{"id": n, "op": "init", "env": {...}}`` sets extra environment variables for all
  later commands. The service sends the creator's ``env_vars`` this way instead of on
  the bwrap command line, where any local user could read them in ``ps``.
* ``{"id": n, "op": "exec", "command": str, "timeout": s, "cap": bytes}`` runs
  ``bash -c command`` in its own session (so its process group can be killed) with cwd
  = the workspace, and answers ``{"id": n, "ok": true, "exitCode", "stdout", "stderr",
  "durationMs", "timedOut", "truncated"}``. Requests are handled concurrently, one
  thread each, and answered in completion order; ``id`` matches them up.
* ``{"id": n, "op": "agent", "state_dir": str, "body": str, "timeout": s, "cap": bytes}``
  does what the kernel's request line does in bash (``docs/agent-protocol.md``) without
  starting bash: reads ``port`` and ``token`` in ``state_dir``, sends ``token body`` to
  the agent on loopback and answers ``{"id": n, "ok": true, "reached": true,
  "payloadBytes": N, "durationMs"}`` followed by one more frame: the N bytes the agent
  wrote, raw (``timedOut`` when it did not finish in time), or ``"reached": false``
  and ``error`` when no agent listens there. It serves
  the service's ``agent`` route, an extension (``routes_runtime``).
* ``{"id": n, "op": "ping"}`` answers ``{"id": n, "ok": true}``.
* When the sandbox is at its process limit so that neither a thread nor ``bash`` can
  be started (a fork bomb's copies holding every slot), the answer after a short retry
  is ``exitCode`` 126 with ``"spawnError": "process_limit"``; the service then ends
  the sandbox, which can no longer run anything.

Processes started by a command (``nohup … &``, a daemonized agent) outlive it: the
sandbox is a long-lived jail, and only its destruction kills everything.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable

# How long to keep collecting output after ``bash -c`` itself has exited. A background
# child that inherited stdout (``nohup sleep 100 &`` without redirection) keeps the
# pipe open forever; waiting for EOF would hang the exec, so we give late writes of
# the command's own last moments a short grace period and then return.
LATE_OUTPUT_GRACE_S = 0.05

# Linux limits one argv string to 128 KiB (MAX_ARG_STRLEN). Longer commands are handed
# to bash as a script in a memfd instead of ``-c``, which bash runs the same way.
MAX_INLINE_COMMAND = 100_000

TIMEOUT_EXIT_CODE = 124  # what timeout(1) uses; callers recognise it
CANNOT_START_EXIT_CODE = 126  # the shell's "found but could not run"
# How long a command start is retried when fork fails with EAGAIN: processes of a
# short-lived burst may exit meanwhile; a fork bomb's copies will not.
SPAWN_RETRY_S = 1.0

_HEADER = struct.Struct(">I")


class Supervisor:
    """Reads request frames, runs commands in threads, writes answer frames."""

    def __init__(self, stdin: object, stdout: object, workspace: str) -> None:
        self._in = stdin
        self._out = stdout
        self._workspace = workspace
        self._write_lock = threading.Lock()
        self._env = dict(os.environ)
        self._groups_lock = threading.Lock()
        self._groups: set[int] = set()

    # -- framing ---------------------------------------------------------------

    def _read_exact(self, n: int) -> bytes | None:
        data = b""
        while len(data) < n:
            chunk = self._in.read(n - len(data))  # type: ignore[attr-defined]
            if not chunk:
                return None
            data += chunk
        return data

    def read_frame(self) -> dict | None:
        header = self._read_exact(_HEADER.size)
        if header is None:
            return None
        (length,) = _HEADER.unpack(header)
        body = self._read_exact(length)
        if body is None:
            return None
        return json.loads(body.decode("utf-8"))

    def send(self, message: dict, payload: bytes | None = None) -> None:
        """One answer frame; ``payload`` (raw bytes) follows it as a second frame and
        the answer says so with ``payloadBytes``: megabytes of an agent's answer then
        cross without being escaped into JSON and parsed back."""
        if payload is not None:
            message = {**message, "payloadBytes": len(payload)}
        body = json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode(
            "utf-8", "surrogatepass"
        )
        frames = [_HEADER.pack(len(body)), body]
        if payload is not None:
            frames += [_HEADER.pack(len(payload)), payload]
        with self._write_lock:
            self._out.write(b"".join(frames))  # type: ignore[attr-defined]
            self._out.flush()  # type: ignore[attr-defined]

    # -- main loop -------------------------------------------------------------

    def serve(self) -> None:
        self.send({"id": 0, "hello": True, "pid": os.getpid()})
        while True:
            request = self.read_frame()
            if request is None:
                return  # the service closed our stdin: it is going away
            op = request.get("op")
            rid = request.get("id")
            if op == "exec":
                self._in_thread(
                    self._exec_and_answer, request, lambda: _at_process_limit(time.monotonic())
                )
            elif op == "agent":
                self._in_thread(
                    self._agent_and_answer,
                    request,
                    lambda: {"reached": False, "spawnError": "process_limit"},
                )
            elif op == "init":
                env = request.get("env") or {}
                self._env.update({str(k): str(v) for k, v in env.items()})
                self.send({"id": rid, "ok": True})
            elif op == "ping":
                self.send({"id": rid, "ok": True})
            else:
                self.send({"id": rid, "ok": False, "error": f"unknown op {op!r}"})

    def kill_all(self) -> None:
        """Kill every process group this supervisor started (used when it must exit)."""
        with self._groups_lock:
            groups = list(self._groups)
        for pgid in groups:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except OSError:
                pass

    # -- exec ------------------------------------------------------------------

    def _exec_and_answer(self, request: dict) -> None:
        rid = request.get("id")
        try:
            result = self.run(
                str(request["command"]), float(request["timeout"]), int(request["cap"])
            )
            result["id"] = rid
            result["ok"] = True
        except Exception as exc:  # answer instead of leaving the service waiting
            result = {"id": rid, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
        self.send(result)

    def _in_thread(
        self, target: Callable[[dict], None], request: dict, at_limit: Callable[[], dict]
    ) -> None:
        """Handle ``request`` on a thread of its own; ``at_limit()`` answers it when no
        thread can start (the sandbox is at its process limit)."""
        try:
            threading.Thread(target=target, args=(request,), daemon=True).start()
        except RuntimeError:
            self.send({"id": request.get("id"), "ok": True, **at_limit()})

    def _agent_and_answer(self, request: dict) -> None:
        rid = request.get("id")
        try:
            result = self.ask_agent(
                str(request["state_dir"]),
                str(request["body"]),
                float(request["timeout"]),
                int(request["cap"]),
            )
        except Exception as exc:  # answer instead of leaving the service waiting
            result = {"reached": False, "error": f"{type(exc).__name__}: {exc}"}
        payload = result.pop("answer", None)
        self.send({"id": rid, "ok": True, **result}, payload)

    def ask_agent(self, state_dir: str, body: str, timeout: float, cap: int) -> dict:
        """One agent request over loopback, as the bash request line makes it."""
        started = time.monotonic()
        directory = os.path.join(self._workspace, state_dir)
        try:
            with open(os.path.join(directory, "port")) as f:
                port = int(f.read().split()[0])
            with open(os.path.join(directory, "token")) as f:
                token = f.read().split()[0]
            sock = socket.create_connection(("127.0.0.1", port), timeout=min(timeout, 10.0))
        except (OSError, ValueError, IndexError) as exc:
            return {"reached": False, "error": f"no agent listens in {state_dir}: {exc}"}
        chunks: list[bytes] = []
        size = 0
        timed_out = False
        with sock:
            try:
                sock.settimeout(timeout)
                sock.sendall(f"{token} {body}\n".encode("ascii", "replace"))
                while data := sock.recv(1 << 18):
                    size += len(data)
                    if size > cap:
                        return {"reached": True, "error": f"the answer is over {cap} bytes"}
                    chunks.append(data)
            except TimeoutError:
                timed_out = True
            except OSError:
                pass  # the agent died mid-answer: what arrived (maybe nothing) says so
        return {
            "reached": True,
            "answer": b"".join(chunks),
            "timedOut": timed_out,
            "durationMs": int((time.monotonic() - started) * 1000),
        }

    def run(self, command: str, timeout: float, cap: int) -> dict:
        started = time.monotonic()
        script_fd = -1
        if len(command.encode("utf-8", "surrogatepass")) > MAX_INLINE_COMMAND:
            script_fd = os.memfd_create("modbox-command", 0)
            os.write(script_fd, command.encode("utf-8", "surrogatepass"))
            os.lseek(script_fd, 0, os.SEEK_SET)
            argv = ["bash", f"/dev/fd/{script_fd}"]
            pass_fds: tuple[int, ...] = (script_fd,)
        else:
            argv = ["bash", "-c", command]
            pass_fds = ()
        try:
            proc = self._spawn(argv, pass_fds)
        except BlockingIOError:
            return _at_process_limit(started)
        except OSError as exc:
            return _result(127, b"", f"modbox: cannot start bash: {exc}\n".encode(), started)
        finally:
            if script_fd >= 0:
                os.close(script_fd)
        with self._groups_lock:
            self._groups.add(proc.pid)
        try:
            return self._collect(proc, started, timeout, cap)
        finally:
            with self._groups_lock:
                self._groups.discard(proc.pid)

    def _spawn(self, argv: list, pass_fds: tuple) -> subprocess.Popen:
        deadline = time.monotonic() + SPAWN_RETRY_S
        delay = 0.01
        while True:
            try:
                return subprocess.Popen(
                    argv,
                    cwd=self._workspace,
                    env=self._env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    start_new_session=True,  # own process group: a timeout kills all of it
                    pass_fds=pass_fds,
                )
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.2)

    def _collect(self, proc: subprocess.Popen, started: float, timeout: float, cap: int) -> dict:
        assert proc.stdout is not None and proc.stderr is not None
        streams = {proc.stdout.fileno(): "stdout", proc.stderr.fileno(): "stderr"}
        kept = {"stdout": bytearray(), "stderr": bytearray()}
        dropped = {"stdout": 0, "stderr": 0}
        selector = selectors.DefaultSelector()
        for fd in streams:
            os.set_blocking(fd, False)
            selector.register(fd, selectors.EVENT_READ)
        # A pidfd wakes the loop the moment bash exits, even while a background child
        # keeps the pipes open; without one (old kernels) we poll every 10 ms.
        try:
            pidfd = os.pidfd_open(proc.pid)
            selector.register(pidfd, selectors.EVENT_READ)
        except (AttributeError, OSError):
            pidfd = -1
        deadline = started + timeout
        exited_at: float | None = None
        timed_out = False
        open_streams = len(streams)
        try:
            while True:
                now = time.monotonic()
                if exited_at is None and pidfd < 0 and proc.poll() is not None:
                    exited_at = now
                if exited_at is not None:
                    if open_streams == 0 or now >= exited_at + LATE_OUTPUT_GRACE_S:
                        break
                    wait = exited_at + LATE_OUTPUT_GRACE_S - now
                elif now >= deadline:
                    timed_out = True
                    _kill_group(proc.pid)
                    proc.wait()
                    exited_at = time.monotonic()
                    continue
                else:
                    wait = deadline - now
                if pidfd < 0:
                    wait = min(wait, 0.01)
                for key, _ in selector.select(wait):
                    fd = key.fd
                    if fd == pidfd:
                        selector.unregister(pidfd)
                        proc.wait()
                        exited_at = time.monotonic()
                        continue
                    try:
                        data = os.read(fd, 65536)
                    except BlockingIOError:
                        continue
                    if not data:
                        selector.unregister(fd)
                        open_streams -= 1
                        continue
                    name = streams[fd]
                    room = cap - len(kept[name])
                    if room > 0:
                        kept[name] += data[:room]
                    dropped[name] += max(0, len(data) - max(room, 0))
        finally:
            selector.close()
            if pidfd >= 0:
                os.close(pidfd)
            proc.stdout.close()
            proc.stderr.close()
        code = proc.wait()
        if code < 0:
            code = 128 - code  # the shell convention for "killed by signal n"
        stdout = _with_marker(bytes(kept["stdout"]), "stdout", dropped["stdout"], cap)
        stderr = _with_marker(bytes(kept["stderr"]), "stderr", dropped["stderr"], cap)
        if timed_out:
            code = TIMEOUT_EXIT_CODE
            if stderr and not stderr.endswith(b"\n"):
                stderr += b"\n"
            stderr += (
                f"modbox: command timed out after {timeout:g} s; its process group was killed\n"
            ).encode()
        result = _result(code, stdout, stderr, started)
        result["timedOut"] = timed_out
        result["truncated"] = bool(dropped["stdout"] or dropped["stderr"])
        return result


def _at_process_limit(started: float) -> dict:
    result = _result(
        CANNOT_START_EXIT_CODE,
        b"",
        b"modbox: cannot start the command: the sandbox is at its process limit\n",
        started,
    )
    result["spawnError"] = "process_limit"
    return result


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass


def _with_marker(data: bytes, name: str, dropped: int, cap: int) -> bytes:
    if not dropped:
        return data
    newline = b"" if data.endswith(b"\n") else b"\n"
    return (
        data
        + newline
        + (
            f"modbox: {name} truncated: {dropped} more bytes not shown (limit {cap} bytes)\n"
        ).encode()
    )


def _result(code: int, stdout: bytes, stderr: bytes, started: float) -> dict:
    return {
        "exitCode": code,
        "stdout": stdout.decode("utf-8", "replace"),
        "stderr": stderr.decode("utf-8", "replace"),
        "durationMs": int((time.monotonic() - started) * 1000),
        "timedOut": False,
        "truncated": False,
    }


def _die_with_parent() -> None:
    """Ask for SIGTERM when the service dies (matters without bwrap's --die-with-parent)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    except Exception:
        pass


def _send_workspace(channel_fd: int, workspace: str) -> None:
    """Hand the service an fd of the workspace, then close the channel for good."""
    channel = socket.socket(fileno=channel_fd)
    try:
        ws_fd = os.open(workspace, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            socket.send_fds(channel, [b"w"], [ws_fd])
        finally:
            os.close(ws_fd)
    finally:
        channel.close()


def main() -> int:
    workspace = os.environ.get("MODBOX_WORKSPACE") or os.getcwd()
    os.environ.pop("MODBOX_WORKSPACE", None)
    if len(sys.argv) == 3 and sys.argv[1] == "--channel-fd":
        _send_workspace(int(sys.argv[2]), workspace)
    # Our own stdout carries frames; anything a library prints must not corrupt them.
    frames_out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    supervisor = Supervisor(sys.stdin.buffer, frames_out, workspace)

    def on_term(signum: int, frame: object) -> None:
        supervisor.kill_all()
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    _die_with_parent()
    try:
        supervisor.serve()
    finally:
        supervisor.kill_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
