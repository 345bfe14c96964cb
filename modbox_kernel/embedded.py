"""Start and stop the embedded local Modbox service as a child process.

Who calls it: :class:`modbox_kernel.session.SandboxSession`, when no API token is
configured (the ``local`` backend). The service is started as
``python -m modbox_kernel.local --port 0 --exit-with-parent`` — a separate process, so
its web stack (Starlette, uvicorn) never enters the kernel's import graph, and
``--exit-with-parent`` makes it (and, through bwrap's ``--die-with-parent``, every
sandbox it runs) go away when the kernel process dies, even by SIGKILL.

The service prints one JSON line with its base URL and token on stdout; that pipe is
the only place the token travels, and this module never logs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field

from .errors import ModboxTimeoutError, ServiceUnreachableError

log = logging.getLogger(__name__)


@dataclass
class EmbeddedService:
    """A running ``modbox_kernel.local`` child; ``start()`` fills ``base_url``/``token``."""

    startup_timeout: float = 30.0
    extra_args: list[str] = field(default_factory=list)
    base_url: str = ""
    token: str = field(default="", repr=False)
    isolation: str = ""
    _proc: asyncio.subprocess.Process | None = field(default=None, repr=False)
    _drain: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def start(self) -> None:
        """Spawn the service and wait for its startup line (raises a sentence on failure)."""
        argv = [
            sys.executable,
            "-m",
            "modbox_kernel.local",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--exit-with-parent",
            *self.extra_args,
        ]
        # stderr is inherited on purpose: the service's log (including the loud
        # "running without bubblewrap" warning) belongs in the kernel's log, which
        # Jupyter shows in its server console; it never contains the token.
        self._proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            start_new_session=True,  # a console Ctrl-C must not reach the service
        )
        assert self._proc.stdout is not None
        try:
            line = await asyncio.wait_for(self._proc.stdout.readline(), self.startup_timeout)
        except asyncio.TimeoutError:
            await self.stop()
            raise ModboxTimeoutError(
                f"the embedded Modbox service did not start within {self.startup_timeout:.0f} s",
                hint="see the kernel log for the service's own messages",
            ) from None
        if not line:
            code = await self._proc.wait()
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
        self._drain = asyncio.ensure_future(self._drain_stdout())
        log.info(
            "embedded Modbox service pid %s at %s (isolation: %s)",
            self._proc.pid,
            self.base_url,
            self.isolation or "unknown",
        )

    async def _drain_stdout(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        with contextlib.suppress(Exception):
            while await self._proc.stdout.read(65536):
                pass

    async def stop(self, timeout: float = 2.0) -> None:
        """Terminate the service (it destroys its sandboxes on SIGTERM), then kill."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proc.wait(), 1.0)
        if self._drain is not None:
            self._drain.cancel()

    def kill_blocking(self) -> None:
        """Last-resort stop from an atexit hook or another thread (no event loop needed)."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(proc.pid, signal.SIGTERM)
