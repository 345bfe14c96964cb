"""One running jail and the framed channel to the supervisor inside it.

Who calls what: ``registry`` creates a :class:`JailProcess` per sandbox from a
``jail.Launch``, awaits :meth:`start` (which returns once the supervisor said hello),
sends commands with :meth:`request`, borrows the workspace with :meth:`workspace_fd`
and ends it with :meth:`kill`. The protocol is described in ``supervisor.py``.
:meth:`start` must run on the event-loop thread: bwrap's ``--die-with-parent``
(PR_SET_PDEATHSIG) fires when the *thread* that forked it ends, and the loop thread
lives as long as the service.

The workspace handle: before its hello, the supervisor sends an fd of its workspace
directory over a socketpair (SCM_RIGHTS). Under bwrap the workspace is a tmpfs that
exists only inside the jail's mount namespace, so that fd is how the files API reaches
it — without a path the sandbox could redirect and without a pid that could be reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import socket
import struct
from collections.abc import Callable
from typing import Any

from .jail import Launch

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">I")
_MAX_FRAME = 256 * 1024 * 1024  # two capped streams plus JSON escaping fit easily
# How long the outer bwrap gets to notice its pid 1 died before it is killed too.
INNER_KILL_GRACE_S = 2.0


class JailGone(Exception):
    """The jail exited (or was killed) before it answered."""


class JailProcess:
    """The process tree of one sandbox, seen from the service."""

    def __init__(
        self,
        sandbox_id: str,
        launch: Launch,
        cwd: str,
        on_exit: Callable[[JailProcess], None] | None = None,
        pid_namespace: bool = False,
    ) -> None:
        self.sandbox_id = sandbox_id
        self._launch = launch
        self._pid_namespace = pid_namespace  # bwrap: the jail has its own pid 1
        self._cwd = cwd
        self._on_exit = on_exit
        self._workspace_fd = -1
        self._proc: asyncio.subprocess.Process | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._hello: asyncio.Future[dict[str, Any]] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._write_lock = asyncio.Lock()
        self.exit_code: int | None = None
        self.last_stderr: list[str] = []

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def unreaped_pid(self) -> int | None:
        """Our child's pid while asyncio has not collected its exit status yet."""
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self.exit_code is None

    @property
    def namespace_gone(self) -> bool:
        """The jail had its own pid namespace and has exited: the kernel killed every
        process in it, and none can be born there any more."""
        proc = self._proc
        return self._pid_namespace and proc is not None and proc.returncode is not None

    async def start(self, timeout: float) -> None:
        """Spawn the jail and wait for the supervisor's hello frame."""
        loop = asyncio.get_running_loop()
        self._hello = loop.create_future()
        # Mark a failed hello as seen even when nobody awaits it any more (timed out).
        self._hello.add_done_callback(lambda f: f.cancelled() or f.exception())
        launch = self._launch
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *launch.argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=launch.env,
                cwd=self._cwd,
                pass_fds=launch.pass_fds,
                # Own session: terminal signals aimed at the service do not reach the
                # jail, and in none mode its process group is what destroy kills.
                start_new_session=True,
                limit=1024 * 1024,
            )
        finally:
            launch.close_child_fds()
        self._tasks = [
            asyncio.create_task(self._read_frames(), name=f"jail-{self.sandbox_id}-out"),
            asyncio.create_task(self._read_stderr(), name=f"jail-{self.sandbox_id}-err"),
        ]
        try:
            await asyncio.wait_for(asyncio.shield(self._hello), timeout)
        except asyncio.TimeoutError:
            raise JailGone(f"the sandbox did not start within {timeout:g} s") from None
        self._workspace_fd = _receive_fd(launch.channel)
        launch.channel.close()
        if self._workspace_fd < 0:
            raise JailGone("the sandbox did not hand over its workspace")

    def workspace_fd(self) -> int:
        """A new fd of the workspace directory; the caller closes it.

        A duplicate, so a file operation running in a worker thread keeps its own
        handle even if the sandbox is destroyed meanwhile (the number can never be
        reused under it for another sandbox's workspace).
        """
        if self._workspace_fd < 0 or not self.alive:
            raise JailGone(self.describe_exit())
        return os.dup(self._workspace_fd)

    async def request(self, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send one request frame and wait for the answer with the same id."""
        if not self.alive or self._proc is None or self._proc.stdin is None:
            raise JailGone(self.describe_exit())
        rid = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        body = json.dumps({**message, "id": rid}, ensure_ascii=False).encode(
            "utf-8", "surrogatepass"
        )
        try:
            async with self._write_lock:
                self._proc.stdin.write(_HEADER.pack(len(body)) + body)
                await self._proc.stdin.drain()
            return await asyncio.wait_for(future, timeout)
        except (ConnectionError, BrokenPipeError):
            raise JailGone(self.describe_exit()) from None
        finally:
            self._pending.pop(rid, None)

    async def kill(self) -> None:
        """SIGKILL the jail (bwrap takes its pid namespace with it) and reap it.

        Under bwrap the first victim is the jail's pid 1 (the outer bwrap's child): the
        kernel then kills the whole pid namespace, and the outer bwrap reaps its child
        and exits on its own. Killing the outer bwrap first would orphan that pid 1 to
        the host's init, to linger as a zombie until init gets round to it.
        """
        proc = self._proc
        if proc is None:
            self.release()
            return
        if proc.returncode is None and self._pid_namespace:
            for child in _children(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proc.wait(), INNER_KILL_GRACE_S)
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                # The process group covers a none-mode supervisor and its direct
                # children; under bwrap the outer bwrap is enough but this is harmless.
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(proc.wait(), 5)
        if proc.stdin is not None:
            proc.stdin.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._finish(proc.returncode)
        self.release()

    def release(self) -> None:
        """Close our handles (the workspace fd keeps a tmpfs workspace in memory)."""
        if self._workspace_fd >= 0:
            os.close(self._workspace_fd)
            self._workspace_fd = -1
        self._launch.close()

    def describe_exit(self) -> str:
        if self.exit_code is None:
            return "the sandbox is not running"
        code = self.exit_code
        # bwrap exits 128+n when the process it runs (our supervisor) dies of signal n.
        signum = -code if code < 0 else code - 128 if 128 < code < 160 else None
        if signum == signal.SIGKILL:
            # Not us (destroy sets its own reason first) and not the OOM killer (the
            # registry checks that): something inside, e.g. os.kill(-1, 9).
            return (
                "every process in the sandbox was killed with SIGKILL (signal 9), "
                "e.g. by os.kill(-1, 9) or kill -9 -1 inside it"
            )
        if signum is not None:
            return f"the sandbox's supervisor was killed by signal {signum}"
        tail = f": {self.last_stderr[-1]}" if self.last_stderr else ""
        return f"the sandbox's process exited with code {code}{tail}"

    # -- internals -------------------------------------------------------------

    async def _read_frames(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        stdout = self._proc.stdout
        try:
            while True:
                header = await stdout.readexactly(_HEADER.size)
                (length,) = _HEADER.unpack(header)
                if length > _MAX_FRAME:
                    log.error("sandbox %s sent an oversized frame", self.sandbox_id)
                    break
                message = json.loads(await stdout.readexactly(length))
                size = message.get("payloadBytes")
                if isinstance(size, int) and not isinstance(size, bool):
                    # A raw frame follows (the supervisor's ``send``): kept as bytes.
                    (length,) = _HEADER.unpack(await stdout.readexactly(_HEADER.size))
                    if length != size or length > _MAX_FRAME:
                        log.error("sandbox %s sent a malformed payload", self.sandbox_id)
                        break
                    message["payload"] = await stdout.readexactly(length)
                self._dispatch(message)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except (ValueError, UnicodeDecodeError):
            log.error("sandbox %s sent a malformed frame", self.sandbox_id)
        code = await self._proc.wait()
        self._finish(code)

    def _dispatch(self, message: dict[str, Any]) -> None:
        if message.get("hello"):
            if self._hello is not None and not self._hello.done():
                self._hello.set_result(message)
            return
        future = self._pending.get(message.get("id", -1))
        if future is not None and not future.done():
            future.set_result(message)

    async def _read_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        while True:
            line = await self._proc.stderr.readline()
            if not line:
                return
            text = line.decode("utf-8", "replace").rstrip()[:1000]
            self.last_stderr = [*self.last_stderr[-9:], text]
            # The sandbox's own stderr is user data: keep it at DEBUG; bwrap's start-up
            # complaints are what an operator needs, and they come before the hello.
            hello_seen = self._hello is not None and self._hello.done()
            log.log(
                logging.DEBUG if hello_seen else logging.WARNING,
                "sandbox %s: %s",
                self.sandbox_id,
                text,
            )

    def _finish(self, code: int | None) -> None:
        if self.exit_code is not None:
            return
        self.exit_code = code if code is not None else -signal.SIGKILL
        gone = JailGone(self.describe_exit())
        if self._hello is not None and not self._hello.done():
            self._hello.set_exception(gone)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(gone)
        if self._on_exit is not None:
            self._on_exit(self)


def _receive_fd(channel: socket.socket) -> int:
    """The fd the supervisor sent before its hello (so it is already queued), or -1."""
    channel.setblocking(False)
    try:
        _, fds, _, _ = socket.recv_fds(channel, 16, 1)
    except OSError:
        return -1
    return fds[0] if fds else -1


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (its main thread's, which is where bwrap forks)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return []
