"""The running cell's control: its task, interrupts and their escalation, its time limit.

Who calls what, and when: the kernel owns one :class:`CellControl`. ``do_execute``
calls :meth:`CellControl.run` with the cell's coroutine and time limit;
SIGINT and ``interrupt_request`` (hopped to the main loop) call
:meth:`CellControl.interrupt`; the time limit's timer calls it too. The first interrupt
asks the agent to raise ``KeyboardInterrupt`` (``interrupt_agent``); if the cell has not
stopped :data:`INTERRUPT_GRACE` seconds later, or at a second interrupt, the cell's task
is cancelled (:attr:`escalated`) and the kernel restarts the sandbox's Python. While the
frontend is being asked for ``input()``, :meth:`input_pause` is what an interrupt
cancels. :func:`cell_time_limit` reads a cell's own limit from its first line.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

# After an interrupt (or a time limit), how long the cell may take to stop before the
# kernel restarts the sandbox's Python process. A second interrupt escalates at once.
INTERRUPT_GRACE = 3.0
# A first line of this form sets a time limit for one cell (seconds).
TIMEOUT_MAGIC = "%%modbox_timeout"


class InputCancelled(Exception):
    """An interrupt arrived while the frontend was being asked for input."""


def cell_time_limit(code: str, default: float) -> tuple[str, float, str | None]:
    """Strip a leading ``%%modbox_timeout N`` line: (code, limit in s, warning or None).

    The line becomes empty rather than removed, so tracebacks keep their line numbers.
    """
    limit = float(default or 0)
    warning = None
    first, sep, rest = code.partition("\n")
    if first.strip().startswith(TIMEOUT_MAGIC):
        arg = first.strip()[len(TIMEOUT_MAGIC) :].strip()
        try:
            limit = float(arg)
        except ValueError:
            warning = f"ignoring {TIMEOUT_MAGIC} with a non-numeric argument"
        code = "\n" + rest if sep else ""
    return code, limit, warning


def red(text: str) -> str:
    """ANSI red, as IPython colours an exception's last line."""
    return f"\x1b[0;31m{text}\x1b[0m"


class CellControl:
    """The state of the cell that is running now (one at a time, main loop only)."""

    def __init__(
        self,
        interrupt_agent: Callable[[], Awaitable[Any]],
        *,
        grace: float = INTERRUPT_GRACE,
    ) -> None:
        self._interrupt_agent = interrupt_agent
        self._grace = grace
        self._task: asyncio.Task[Any] | None = None
        # While the cell waits for its sandbox, an interrupt just stops the wait.
        self.waiting_for_sandbox = False
        self._input_wait: asyncio.Future[None] | None = None
        self._interrupts = 0
        self.escalated = False
        self._escalation: asyncio.TimerHandle | None = None
        self._timed_out: float | None = None
        self._tasks: set[asyncio.Future[Any]] = set()

    async def run(self, coro: Coroutine[Any, Any, dict[str, Any]], limit: float) -> dict[str, Any]:
        """Run the cell's coroutine as the interruptible task, under ``limit`` s (0: none).

        Raises ``CancelledError`` when an interrupt stopped it without the agent's help
        (while it waited for the sandbox, or after :attr:`escalated`).
        """
        self._interrupts = 0
        self.escalated = False
        self._timed_out = None
        task = asyncio.ensure_future(coro)
        self._task = task
        loop = asyncio.get_event_loop()
        timer = loop.call_later(limit, self._on_time_limit, limit) if limit > 0 else None
        try:
            return await task
        finally:
            if timer is not None:
                timer.cancel()
            if self._escalation is not None:
                self._escalation.cancel()
                self._escalation = None
            self._task = None
            self.waiting_for_sandbox = False

    def interrupt(self) -> None:
        """Stop the running cell: ask the agent first, escalate if that does not work."""
        task = self._task
        if task is None or task.done():
            return
        if self.waiting_for_sandbox:
            task.cancel()  # nothing runs remotely yet: just stop waiting
            return
        if self._input_wait is not None and not self._input_wait.done():
            self._input_wait.cancel()  # the frontend's prompt is moot now
        self._interrupts += 1
        if self._interrupts >= 2:
            self._escalate()
            return
        self._background(self._interrupt_agent())
        loop = asyncio.get_event_loop()
        self._escalation = loop.call_later(self._grace, self._escalate)

    async def input_pause(self, seconds: float) -> None:
        """Wait a moment for the frontend's input_reply; InputCancelled if interrupted."""
        # A future per wait, so an interrupt can end it (see interrupt()).
        waiter: asyncio.Future[None] = asyncio.get_event_loop().create_future()
        self._input_wait = waiter
        await asyncio.wait({waiter}, timeout=seconds)
        self._input_wait = None
        if waiter.cancelled():
            raise InputCancelled()

    def _background(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)  # keep a reference until done (asyncio holds weak ones)
        task.add_done_callback(self._tasks.discard)

    def _escalate(self) -> None:
        """The cell ignored KeyboardInterrupt: end it (the kernel restarts the agent)."""
        task = self._task
        if task is None or task.done() or self.escalated:
            return
        self.escalated = True
        task.cancel()

    def _on_time_limit(self, limit: float) -> None:
        self._timed_out = limit
        self.interrupt()

    # -- the time limit's words

    @property
    def timed_out(self) -> bool:
        """Whether the running cell hit its time limit (its interrupt is the limit's)."""
        return self._timed_out is not None

    def limit_sentence(self) -> str:
        return (
            f"the cell exceeded its time limit of {self._timed_out:g} s "
            f"(set by ModboxKernel.cell_timeout / MODBOX_CELL_TIMEOUT, or {TIMEOUT_MAGIC} "
            "on the cell's first line)"
        )

    def time_limit_error(self, error: dict[str, Any]) -> dict[str, Any]:
        """``error`` (the agent's KeyboardInterrupt) as the time-limit error it really is.

        The traceback is kept (it shows where the cell was), with the reason as its last
        line.
        """
        text = f"Modbox: {self.limit_sentence()}."
        traceback = [*error.get("traceback", []), red(f"CellTimeoutError: {text}")]
        return {**error, "ename": "CellTimeoutError", "evalue": text, "traceback": traceback}

    def rewrite_error(self, error: dict[str, Any]) -> dict[str, Any]:
        """The error to show: a KeyboardInterrupt caused by the time limit says so.

        Used for the published error output and for the reply, so that both name the
        same exception: nbclient reports the reply, papermill and the saved notebook
        show the output.
        """
        if self.timed_out and error.get("ename") == "KeyboardInterrupt":
            return self.time_limit_error(error)
        return error
