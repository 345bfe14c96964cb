"""The relay: one request's agent events become IOPub messages.

Who calls what, and when: the kernel makes one :class:`OutputRelay` per execute request
(or frontend comm message) and hands :meth:`OutputRelay.event` to the session, which
calls it for every event the agent sends, in order. The relay coalesces stream text
(at most one message per stream per :data:`STREAM_FLUSH_INTERVAL`), guards the output
cap behind the agent's own, shows and clears the "starting a sandbox" progress line,
and publishes everything else as the Jupyter message of the same type. It knows
nothing of the kernel: it gets callables for publishing, for answering an
``input_request`` and for rewriting an error (the time limit's), and never parses
output text.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from . import protocol

# Relay stream text to IOPub at most this often while a cell runs (so a print flood
# becomes at most ~50 messages/s, far under jupyter_server's 1000 msg/s limit).
STREAM_FLUSH_INTERVAL = 0.02
STREAM_FLUSH_BYTES = 64 * 1024
# Slack above the output limit before this guard cuts: the agent cuts at the limit and
# adds the notice, and the notice must not be cut again here.
GUARD_SLACK = 64 * 1024

#: publish(msg_type, content, metadata, buffers): sends one IOPub message.
Publish = Callable[[str, dict[str, Any], dict[str, Any] | None, list[bytes] | None], None]
#: answer_input(input_request event): asks the frontend and sends the answer back.
AnswerInput = Callable[[dict[str, Any]], Awaitable[None]]
#: rewrite_error(error content) -> the content to publish instead.
RewriteError = Callable[[dict[str, Any]], dict[str, Any]]

_relay_ids = itertools.count(1)


class OutputRelay:
    """Turns agent events into IOPub messages for one request, coalescing stream text."""

    def __init__(
        self,
        publish: Publish,
        *,
        silent: bool,
        output_limit: int = 0,
        execution_count: int = 0,
        answer_input: AnswerInput | None = None,
        rewrite_error: RewriteError | None = None,
    ) -> None:
        self._publish = publish
        self.silent = silent
        self._execution_count = execution_count
        self._answer_input = answer_input
        self._rewrite_error = rewrite_error
        # A second guard behind the agent's own per-cell cap: an agent that ignores the
        # limit still cannot grow kernel memory.
        self._configured_limit = output_limit
        self._limit = output_limit + GUARD_SLACK if output_limit else 0
        self._streamed = 0
        self._truncated = False
        # Pending stream text as runs of one stream name, in arrival order, so
        # interleaved stdout/stderr keep their order when flushed.
        self._runs: list[list[str]] = []
        self._pending = 0
        self._last_flush = time.monotonic()
        self._timer: asyncio.TimerHandle | None = None
        self._progress_id = f"modbox-progress-{os.getpid()}-{next(_relay_ids)}"

    def publish(self, msg_type: str, content: dict[str, Any]) -> None:
        """Send one output message (a silent request sends only its errors)."""
        if self.silent and msg_type != protocol.EV_ERROR:
            return
        self._publish(msg_type, content, None, None)

    def stream(self, name: str, text: str) -> None:
        """Queue stream text; it goes out within :data:`STREAM_FLUSH_INTERVAL`."""
        if not text:
            return
        if self._limit:
            if self._truncated:
                return
            room = self._limit - self._streamed
            if len(text) > room:
                text = text[: max(0, room)] + protocol.truncation_notice(self._configured_limit)
                self._truncated = True
            self._streamed += len(text)
        if self._runs and self._runs[-1][0] == name:
            self._runs[-1].append(text)
        else:
            self._runs.append([name, text])
        self._pending += len(text)
        since = time.monotonic() - self._last_flush
        if self._pending >= STREAM_FLUSH_BYTES or since >= STREAM_FLUSH_INTERVAL:
            self.flush()
        elif self._timer is None:
            # Bound the delay: whatever is buffered goes out at the end of the current
            # interval even if no further event arrives for a while.
            loop = asyncio.get_event_loop()
            self._timer = loop.call_later(STREAM_FLUSH_INTERVAL - since, self.flush)

    def flush(self) -> None:
        """Send the queued stream text now (before any other output, and at the end)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        runs, self._runs = self._runs, []
        for name, *texts in runs:
            self.publish(protocol.EV_STREAM, {"name": name, "text": "".join(texts)})
        self._pending = 0
        self._last_flush = time.monotonic()

    async def event(self, event: dict[str, Any]) -> None:
        """One agent event (the session's ``on_event`` callback)."""
        kind = event.get("type")
        if kind == protocol.EV_STREAM:
            self.stream(str(event.get("name", "stdout")), str(event.get("text", "")))
            return
        self.flush()
        if kind == protocol.EV_INPUT_REQUEST:
            if self._answer_input is not None:
                await self._answer_input(event)
            return
        content = {k: v for k, v in event.items() if k not in ("type", "seq")}
        if kind == protocol.EV_ERROR and self._rewrite_error is not None:
            content = self._rewrite_error(content)
        if kind == protocol.EV_EXECUTE_RESULT:
            content["execution_count"] = self._execution_count
        if kind in ("display_data", "update_display_data", "execute_result"):
            content.setdefault("metadata", {})
            content.setdefault("data", {})
            if kind != protocol.EV_EXECUTE_RESULT:
                content.setdefault("transient", {})
        if kind in protocol.COMM_EVENTS:
            # Published even for silent requests (ipykernel does too): widget state.
            metadata = content.pop("_metadata", {})
            buffers = [base64.b64decode(b) for b in content.pop("_buffers", [])]
            self._publish(str(kind), content, metadata, buffers)
            return
        if kind in protocol.OUTPUT_EVENTS:
            self.publish(str(kind), content)

    def progress(self, text: str, *, update: bool) -> None:
        """Show (or update) the one-line progress display of this request."""
        content = {
            "data": {"text/plain": text},
            "metadata": {},
            "transient": {"display_id": self._progress_id},
        }
        self.publish("update_display_data" if update else "display_data", content)

    def clear_progress(self) -> None:
        # The cell has no output of its own yet, so clearing removes only the progress
        # line and nothing stale is left in a saved notebook.
        self.publish("clear_output", {"wait": False})
