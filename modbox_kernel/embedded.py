"""Start and stop the embedded local Modbox service as a child process.

Who calls it: :class:`modbox_kernel.session.SandboxSession`, when no API token is
configured (the ``local`` backend), and ``__main__``, which calls :func:`start_early`
before the kernel's own imports. The service is started as ``python -m
modbox_kernel.local --port 0 --exit-with-parent --pool 1 --pool-once`` — a separate
process, so its web stack (Starlette, uvicorn) never enters the kernel's import graph,
and ``--exit-with-parent`` makes it (and, through bwrap's ``--die-with-parent``, every
sandbox it runs) go away when the kernel process dies, even by SIGKILL. ``--pool 1``
has it make the kernel's first sandbox, with the agent started and IPython imported,
before the kernel asks for one; ``--pool-once`` keeps it from making a second.

Why early: importing ipykernel takes the kernel process about half a second, and the
service needs about as long to import its web stack and prepare that sandbox. Started
first thing, the two overlap on separate cores instead of following each other; the
first cell then finds its sandbox ready. The early process is adopted by the first
:meth:`EmbeddedService.start`, or killed at exit when no local sandbox was wanted
(a configuration file chose the remote backend).

The service prints one JSON line with its base URL and token on stdout; that pipe is
the only place the token travels, and this module never logs it.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field

from .errors import ModboxTimeoutError, ServiceUnreachableError

log = logging.getLogger(__name__)

SERVICE_ARGS = (
    "--host",
    "127.0.0.1",
    "--port",
    "0",
    "--exit-with-parent",
    "--pool",
    "1",
    "--pool-once",
)

# The service started by start_early(), until a start() takes it.
_early: subprocess.Popen[bytes] | None = None


def _spawn(extra_args: list[str]) -> subprocess.Popen[bytes]:
    # stderr is inherited on purpose: the service's log (including the loud
    # "running without bubblewrap" warning) belongs in the kernel's log, which
    # Jupyter shows in its server console; it never contains the token.
    return subprocess.Popen(
        [sys.executable, "-m", "modbox_kernel.local", *SERVICE_ARGS, *extra_args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        start_new_session=True,  # a console Ctrl-C must not reach the service
    )


def start_early() -> None:
    """Spawn the service now, for the session to adopt later (idempotent)."""
    global _early
    if _early is None:
        try:
            _early = _spawn([])
        except OSError as exc:  # start() will try again and report it properly
            log.debug("could not start the embedded service early: %s", exc)
            return
        atexit.register(discard_early)


def discard_early() -> None:
    """Stop an early service nobody adopted (the remote backend, or the kernel's exit)."""
    global _early
    proc, _early = _early, None
    if proc is not None and proc.poll() is None:
        # Waited for (briefly): nothing of an unused service may outlive this call.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            proc.terminate()
        try:
            proc.wait(2.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _take_early() -> subprocess.Popen[bytes] | None:
    global _early
    proc, _early = _early, None
    if proc is not None and proc.poll() is not None:
        return None  # it died (a broken install): start() spawns one and reports why
    return proc


@dataclass
class EmbeddedService:
    """A running ``modbox_kernel.local`` child; ``start()`` fills ``base_url``/``token``."""

    startup_timeout: float = 30.0
    extra_args: list[str] = field(default_factory=list)
    base_url: str = ""
    token: str = field(default="", repr=False)
    isolation: str = ""
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    async def start(self) -> None:
        """Spawn (or adopt) the service and wait for its startup line (raises a
        sentence on failure)."""
        proc = None if self.extra_args else _take_early()
        self._proc = proc = proc or _spawn(self.extra_args)
        assert proc.stdout is not None
        try:
            # A thread, since Popen's pipe is not an asyncio stream; if the deadline
            # passes, stop() kills the service and the read ends with the pipe.
            line = await asyncio.wait_for(
                asyncio.to_thread(proc.stdout.readline), self.startup_timeout
            )
        except asyncio.TimeoutError:
            await self.stop()
            raise ModboxTimeoutError(
                f"the embedded Modbox service did not start within {self.startup_timeout:.0f} s",
                hint="see the kernel log for the service's own messages",
            ) from None
        if not line:
            code = await asyncio.to_thread(proc.wait)
            raise ServiceUnreachableError(
                f"the embedded Modbox service exited during startup (exit code {code})",
                hint="see the kernel log; with MODBOX_REQUIRE_ISOLATION=1 it refuses to start "
                "without a working bubblewrap (apt-get install bubblewrap)",
            )
        try:
            info = json.loads(line)
            self.base_url = str(info["base_url"])
            self.token = str(info["token"])
            self.isolation = str(info.get("isolation", ""))
        except (ValueError, KeyError, TypeError):
            await self.stop()
            raise ServiceUnreachableError(
                "the embedded Modbox service printed an unreadable startup line"
            ) from None
        # Keep reading stdout so a chatty service can never block on a full pipe.
        threading.Thread(
            target=_drain, args=(proc,), name="modbox-service-stdout", daemon=True
        ).start()
        log.info(
            "embedded Modbox service pid %s at %s (isolation: %s)",
            proc.pid,
            self.base_url,
            self.isolation or "unknown",
        )

    async def stop(self, timeout: float = 2.0) -> None:
        """Terminate the service (it destroys its sandboxes on SIGTERM), then kill."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(Exception):
                await asyncio.to_thread(proc.wait, 1.0)

    def kill_blocking(self) -> None:
        """Last-resort stop from an atexit hook or another thread (no event loop needed)."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(proc.pid, signal.SIGTERM)


def _drain(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdout is not None
    with contextlib.suppress(Exception):
        while proc.stdout.read(65536):
            pass
