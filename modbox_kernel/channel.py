"""The agent channel: requests to the in-sandbox agent, each carried by one exec.

Who calls what, and when: the session (``session.py``) makes one :class:`AgentChannel`
per sandbox once its agent runs, and sends every request through it: a cell is
:meth:`AgentChannel.run_cell` (submit, then long-polls until ``done``), interrupts,
``input()`` answers and the namespace's questions are single :meth:`request` calls.

Transport (``docs/agent-protocol.md``): the exec command is a fixed bash line carrying
base64 JSON, or the path of an uploaded file for large requests, so cell source never
passes through shell interpolation. Requests that may be repeated (``execute`` is
deduplicated by cell id in the agent, ``poll`` only reads) are retried through
transport faults; events carry sequence numbers, so a retried request loses and
duplicates nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from . import agent as agent_mod
from . import protocol
from .api import SandboxRuntime
from .errors import AgentError, ApiError, ModboxTimeoutError, ServiceUnreachableError
from .uploads import put_file, tail

log = logging.getLogger(__name__)

EventCallback = Callable[[dict[str, Any]], Awaitable[None]]
# Wraps each request of a cell: the session turns "agent unreachable" into a lost sandbox.
Guard = Callable[[Awaitable[dict[str, Any]]], Awaitable[dict[str, Any]]]

# How long one long-poll exec may wait inside the agent before answering empty.
POLL_WAIT = 1.0
# How long the submitting exec waits for a short cell to finish (one round trip).
SUBMIT_WAIT = 0.1
# A poll holds back stream text alone until this long after the previous answer, so a
# flood of prints reaches IOPub as a few tens of messages per second, not thousands.
MIN_STREAM_INTERVAL = 0.02
# The largest request (base64 characters) sent inline through the agent route; beyond
# it the request is uploaded and sent by exec (the service takes 16 MiB bodies).
ROUTE_INLINE_LIMIT = 4 * 1024 * 1024
# How long transient transport faults (resets, 5xx, stalls) are retried while a cell
# runs before the cell fails with a sentence.
TRANSPORT_RETRY_WINDOW = 30.0


class AgentUnreachable(Exception):
    """The exec ran but the agent did not answer (it is dead or was never started)."""


class AgentChannel:
    """Requests to the agent of one sandbox (``state_dir`` holds its port and token)."""

    def __init__(
        self,
        runtime: SandboxRuntime,
        state_dir: str,
        *,
        upload_dir: str | None,
        give_up: Callable[[], bool] = lambda: False,
    ) -> None:
        self.runtime = runtime
        self.state_dir = state_dir
        # Where uploads land (learned at bootstrap), or None: write large requests by exec.
        self.upload_dir = upload_dir
        # True when retrying is pointless (the embedded service this kernel runs died).
        self._give_up = give_up
        # Whether to use the service's agent route when the sandbox advertises one.
        self._agent_route = True

    async def request(
        self, payload: dict[str, Any], *, read_timeout: float = 30.0
    ) -> dict[str, Any]:
        """Send one request and return the agent's JSON answer (``ok`` is true).

        Raises :class:`AgentUnreachable` when no agent answered, :class:`AgentError`
        when it refused or answered nonsense, and the runtime's errors otherwise.
        """
        b64 = agent_mod.encode_request(payload)
        if (
            self.runtime.agent_url is not None
            and self._agent_route
            and len(b64) <= ROUTE_INLINE_LIMIT
        ):
            answer = await self._ask_by_route(b64, read_timeout)
            if answer is not None:
                return answer
        if len(b64) <= agent_mod.INLINE_LIMIT:
            command = agent_mod.request_command(self.state_dir, encoded=b64)
        else:
            # The agent takes a base64 body in the file as well: no second encoding.
            name = f"modbox-req-{uuid.uuid4().hex}.json"
            path = await put_file(
                self.runtime,
                self.state_dir,
                name,
                b64.encode("ascii"),
                upload_dir=self.upload_dir,
            )
            command = agent_mod.request_command(self.state_dir, ref=path)
        res = await self.runtime.exec(command, read_timeout=read_timeout)
        if res.exit_code == agent_mod.UNREACHABLE_EXIT:
            raise AgentUnreachable(tail(res))
        line = res.stdout.strip()
        if not line and res.exit_code == 0:
            # The connection closed without an answer: the agent died while handling
            # this request (a cell that killed its own process, a segfault, the OOM killer).
            raise AgentUnreachable(tail(res))
        return _answer(line, lambda: tail(res))

    async def _ask_by_route(self, b64: str, read_timeout: float) -> dict[str, Any] | None:
        """The request through the local service's ``agent`` route: no bash, no JSON
        around the answer. None when the route turned out not to exist (then this
        channel uses exec from now on)."""
        try:
            line = await self.runtime.ask_agent(self.state_dir, b64, read_timeout=read_timeout)
        except ApiError as exc:
            if exc.code == "agent_unreachable":
                raise AgentUnreachable(exc.service_message or str(exc)) from exc
            if exc.status_code in (404, 405) and exc.code != "sandbox_not_found":
                log.info("the service has no agent route after all; using exec")
                self._agent_route = False
                return None
            raise
        line = line.strip()
        if not line:
            raise AgentUnreachable("the agent closed the connection without an answer")
        return _answer(line, lambda: line[-300:])

    async def request_retrying(
        self, payload: dict[str, Any], *, read_timeout: float
    ) -> dict[str, Any]:
        """Like :meth:`request` for idempotent requests: transport faults are retried.

        Safe because ``execute`` is deduplicated by cell id in the agent and ``poll``
        only reads; so a reset connection or a 503 burst loses and repeats nothing.
        """
        deadline: float | None = None
        delay = 0.05
        while True:
            try:
                return await self.request(payload, read_timeout=read_timeout)
            except (ServiceUnreachableError, ModboxTimeoutError, ApiError) as exc:
                if isinstance(exc, ApiError) and not transient(exc):
                    raise
                if self._give_up():
                    raise  # nothing to wait for: the session reports the lost sandbox
                # The window starts at the first fault: one stalled request that used up
                # its whole read timeout must still get a retry.
                if deadline is None:
                    deadline = time.monotonic() + TRANSPORT_RETRY_WINDOW
                if time.monotonic() + delay > deadline:
                    raise ServiceUnreachableError(
                        f"lost contact with the Modbox service for {TRANSPORT_RETRY_WINDOW:.0f} s "
                        f"while the cell ran ({exc.message})",
                        hint="the sandbox may still be running it; check the network or the "
                        "service, then run the next cell",
                    ) from exc
                log.warning("transport fault talking to the sandbox (%s); retrying", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def run_cell(
        self, cell: protocol.CellRequest, on_event: EventCallback, guard: Guard
    ) -> dict[str, Any]:
        """Run one cell; call ``on_event`` for each event in order; return the done event.

        The cursor: ``since`` is the number of the next event this side needs. Events
        below it (a retried request's repeats) are skipped, and each poll asks for
        events from it on, so every event is relayed exactly once.

        Pipelining: once a cell outlives its submit, two polls are out at all times.
        Each names the one before it (``after``), so the agent answers it from where
        that one ended, while this side still reads the previous answer: output waits
        for one trip from the sandbox, not for a request to be sent first, and a flood
        moves while the last batch is still on its way. Answers are read in the order
        the polls were sent; a retried poll repeats events, never skips them.
        """
        since = 0
        submit = protocol.execute_request(cell, wait=SUBMIT_WAIT, since=0)
        answer = await guard(self.request_retrying(submit, read_timeout=30.0))
        ahead: asyncio.Future[dict[str, Any]] | None = None
        ahead_rid: str | None = None
        try:
            while True:
                for event in answer.get("events", []):
                    seq = int(event.get("seq", since))
                    if seq < since:
                        continue  # already relayed before a retried request
                    since = seq + 1
                    if event.get("type") == protocol.EV_DONE:
                        return event
                    await on_event(event)
                since = max(since, int(answer.get("next", since)))
                if ahead is None:
                    ahead, ahead_rid = self._poll(cell.cell_id, since, None)
                # The poll after the one we are about to read goes out first.
                head, head_rid = ahead, ahead_rid
                ahead, ahead_rid = self._poll(cell.cell_id, since, head_rid)
                # The guard only around the poll being read: a poll left out when the
                # cell ends must not report the sandbox lost (a restarted agent no
                # longer knows the cell).
                answer = await guard(head)
        finally:
            if ahead is not None:
                # Not cancelled: its connection stays usable once the agent answers
                # (at once, as the cell is done); the answer is not needed.
                ahead.add_done_callback(_ignore)

    def _poll(
        self, cell_id: str, since: int, after: str | None
    ) -> tuple[asyncio.Future[dict[str, Any]], str]:
        rid = uuid.uuid4().hex[:12]
        # A poll queued behind another waits twice as long: while a cell is silent the
        # two then take turns, one answer a second, instead of both ending together.
        wait = POLL_WAIT if after is None else 2 * POLL_WAIT
        poll = protocol.poll_request(
            cell_id, since=since, wait=wait, rid=rid, after=after, coalesce=MIN_STREAM_INTERVAL
        )
        task = asyncio.ensure_future(self.request_retrying(poll, read_timeout=wait + 10.0))
        return task, rid


def _ignore(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not log it


def _answer(line: str, describe: Callable[[], str]) -> dict[str, Any]:
    """The agent's JSON answer line, or the error it amounts to."""
    try:
        answer = json.loads(line) if line else None
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise AgentError(f"the sandbox agent gave an unreadable answer: {describe()}")
    if not answer.get("ok"):
        raise AgentError(f"the sandbox agent refused a request: {answer.get('error')}")
    return answer


def transient(exc: ApiError) -> bool:
    """Whether an HTTP error answer is worth retrying (overload, gateway trouble)."""
    return exc.status_code in (408, 425, 429, 502, 503, 504)
