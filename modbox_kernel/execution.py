"""One cell in the sandbox, from waiting for the sandbox to the execute reply.

Who calls what, and when: ``ModboxKernel.do_execute`` builds the cell's request and
its relay and calls :meth:`CellExecution.run`, which runs the cell as the running
cell's task (``cellcontrol.py``), waits for the sandbox (showing a progress line after
a moment), prints the session's notices, streams the cell through the session and
turns every outcome into the reply dict ipykernel sends: the agent's ``done`` event, a
lost sandbox, an interrupt that had to restart the agent, a time limit, a malformed
setting. Every failure is also published as an ``error`` output (papermill and nbclient
look for it there) and no exception escapes (no reply would hang the client).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from . import protocol
from .cellcontrol import CellControl, red
from .errors import ModboxError, SandboxLostError
from .relay import OutputRelay
from .session import SandboxSession

log = logging.getLogger(__name__)

# Show provisioning progress in the first cell only if it takes longer than this.
PROGRESS_AFTER = 1.0


class CellExecution:
    """Runs cells in one kernel's sandbox session (one at a time)."""

    def __init__(
        self, sandbox: SandboxSession, control: CellControl, *, problems: list[str]
    ) -> None:
        self.sandbox = sandbox
        self.control = control
        # Malformed settings: no sandbox is started, every cell says what to fix.
        self._problems = list(problems)
        self._count = 0
        self._usage: dict[str, Any] | None = None

    def take_usage(self) -> dict[str, Any] | None:
        """The last cell's figures from the sandbox (time, CPU, peak memory), once."""
        usage, self._usage = self._usage, None
        return usage

    async def run(
        self, cell: protocol.CellRequest, relay: OutputRelay, limit: float
    ) -> dict[str, Any]:
        """The execute reply for ``cell``, run under a time limit of ``limit`` s (0: none)."""
        self._count = cell.execution_count
        try:
            reply = await self.control.run(self._run_cell(cell, relay), limit)
            if reply.get("status") == "error":
                reply = self.control.rewrite_error(reply)
            return reply
        except asyncio.CancelledError:
            relay.flush()
            if self.control.escalated:
                return await self._escalated_reply(relay)
            # The provisioning is shielded (session.ensure_ready): say so, or the user
            # would think the interrupt gave up the sandbox, or the place in line.
            text = (
                "interrupted while waiting for the sandbox. It goes on starting (keeping "
                "its place in line, if it waits for one), and the next cell runs in it."
            )
            error = self.control.rewrite_error(
                {
                    "ename": "KeyboardInterrupt",
                    "evalue": text,
                    "traceback": [red(f"KeyboardInterrupt: {text}")],
                }
            )
            return self._error_reply(relay, error["ename"], error["evalue"], error["traceback"])
        except Exception as exc:  # never let an exception escape: no reply = hung client
            relay.flush()
            log.exception("cell failed in the kernel")
            return self._error_reply(relay, type(exc).__name__, str(exc), [f"{exc}"])

    async def run_magic(
        self, count: int, run: Callable[[], Awaitable[list[dict[str, Any]]]], relay: OutputRelay
    ) -> dict[str, Any]:
        """The reply for a cell of ``%modbox`` lines, which the kernel runs itself
        (``magic.py``): ``run()`` gives its payloads or raises MagicError."""
        from .magic import MagicError

        self._count = count
        if self._problems:
            return self._problems_reply(relay)

        async def interruptible() -> dict[str, Any]:
            # Nothing runs in the sandbox's Python: an interrupt just stops waiting.
            self.control.waiting_for_sandbox = True
            payload = await run()
            return {
                "status": "ok",
                "execution_count": count,
                "payload": payload,
                "user_expressions": {},
            }

        try:
            return await self.control.run(interruptible(), 0)
        except asyncio.CancelledError:
            text = "%modbox was interrupted"
            return self._error_reply(relay, "KeyboardInterrupt", text, [red(text)])
        except MagicError as exc:
            text = str(exc)
            return self._error_reply(relay, "UsageError", text, [red(f"UsageError: {text}")])
        except Exception as exc:  # never let an exception escape: no reply = hung client
            log.exception("%%modbox failed")
            return self._error_reply(relay, type(exc).__name__, str(exc), [red(str(exc))])

    async def _escalated_reply(self, relay: OutputRelay) -> dict[str, Any]:
        try:
            await asyncio.wait_for(self.sandbox.restart_agent(), timeout=30)
        except Exception as exc:
            log.warning("could not restart the sandbox agent: %s", exc)
        timed_out = self.control.timed_out
        why = (
            self.control.limit_sentence()
            if timed_out
            else "the cell did not stop after an interrupt"
        )
        text = (
            f"{why}; the Python process in the sandbox was restarted, so all variables "
            "and imports were lost (files in the sandbox were kept)"
        )
        ename = "CellTimeoutError" if timed_out else "KeyboardInterrupt"
        return self._error_reply(relay, ename, text, [red(f"{ename}: {text}")])

    async def _run_cell(self, cell: protocol.CellRequest, relay: OutputRelay) -> dict[str, Any]:
        if self._problems:
            return self._problems_reply(relay)
        try:
            await self._wait_for_sandbox(relay)
        except ModboxError as exc:
            return self._error_reply(relay, "SandboxUnavailable", str(exc), [red(str(exc))])
        for notice in self.sandbox.take_notices():
            relay.stream("stderr", notice + "\n")
        try:
            done = await self.sandbox.execute(cell, relay.event)
        except SandboxLostError as exc:
            relay.flush()
            text = (
                f"{exc}. Variables of this session are lost, and so are files not copied "
                "back to the notebook's folder; the next cell starts a fresh sandbox."
            )
            return self._error_reply(relay, "SandboxLost", text, [red(text)])
        except ModboxError as exc:
            relay.flush()
            return self._error_reply(relay, "ModboxError", str(exc), [red(str(exc))])
        relay.flush()
        # The cell's files reach the host before its reply, as a local kernel's would.
        notices = await self.sandbox.files.after_cell(done.get("files"))
        for notice in notices:
            relay.stream("stderr", notice + "\n")
        if notices:
            relay.flush()
        return self._reply_from_done(done)

    def _problems_reply(self, relay: OutputRelay) -> dict[str, Any]:
        """Malformed settings: no sandbox was started; the cell says what to fix."""
        text = (
            "Modbox Python cannot start a sandbox: "
            + "; ".join(self._problems)
            + ". Fix the kernel's environment (kernel.json env, or the shell that starts "
            "Jupyter) and restart the kernel."
        )
        return self._error_reply(relay, "ConfigurationError", text, [red(text)])

    async def _wait_for_sandbox(self, relay: OutputRelay) -> None:
        if self.sandbox.ready:
            return
        self.control.waiting_for_sandbox = True
        ready = asyncio.ensure_future(self.sandbox.ensure_ready())
        t0 = time.monotonic()
        shown = False
        try:
            while True:
                done, _ = await asyncio.wait({ready}, timeout=PROGRESS_AFTER if not shown else 1.0)
                if done:
                    break
                text = f"Starting a Modbox sandbox… {time.monotonic() - t0:.0f} s"
                if self.sandbox.waiting:
                    # At capacity: say so, and the place in line where the service says it.
                    text = (
                        f"Waiting for a Modbox sandbox… {time.monotonic() - t0:.0f} s: "
                        f"{self.sandbox.waiting}"
                    )
                relay.progress(text, update=shown)
                shown = True
        except asyncio.CancelledError:
            ready.cancel()
            if shown:
                relay.clear_progress()
            raise
        finally:
            self.control.waiting_for_sandbox = False
        if shown:
            relay.clear_progress()
        ready.result()  # raises the provisioning error, if any

    def _reply_from_done(self, done: dict[str, Any]) -> dict[str, Any]:
        usage = done.get("usage")
        self._usage = usage if isinstance(usage, dict) else None
        status = done.get("status", "ok")
        reply: dict[str, Any] = {"status": status, "execution_count": self._count}
        if status == "error":
            reply.update(
                ename=done.get("ename", "Error"),
                evalue=done.get("evalue", ""),
                traceback=done.get("traceback", []),
            )
        else:
            reply.update(
                payload=done.get("payload", []),
                user_expressions=done.get("user_expressions", {}),
            )
        return reply

    def _error_reply(
        self, relay: OutputRelay, ename: str, evalue: str, traceback: list[str]
    ) -> dict[str, Any]:
        # Publish the error as output too: papermill and nbclient look for it there.
        relay.publish("error", {"ename": ename, "evalue": evalue, "traceback": traceback})
        return {
            "status": "error",
            "execution_count": self._count,
            "ename": ename,
            "evalue": evalue,
            "traceback": traceback,
        }
