"""Cells, their numbered events, and the cursor the kernel reads them with.

A :class:`Cell` is created by a server thread (``ops``) from an ``execute`` request,
run by the main thread (``core``) and read by server threads; every field except the
request itself is guarded by the agent's condition (``Agent.cond``), which the callers
of the functions below hold. Events are numbered from 0 per cell; the kernel asks for
"everything from ``since``", so a resent poll loses and duplicates nothing, and what it
already holds can be freed. :class:`WorkQueue` takes cells (and :class:`Call`
objects) from the server threads to the main thread's event loop.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from typing import Any, Callable, Deque, Dict, List, Optional

from . import protocol
from .protocol import truncation_notice
from .wire import ENCODED_EVENTS, MAX_RESPONSE_BYTES, MERGE_LIMIT, Event, encode_event

#: Cells whose events are kept; older finished cells keep only their id.
KEEP_CELLS = 200
#: Events of the background log (output between cells) kept while nobody reads them;
#: the oldest go first. Stream events hold at most ``MERGE_LIMIT`` characters each.
KEEP_BACKGROUND_EVENTS = 256


class Cell:
    """One ``execute`` request and the numbered events it produced."""

    def __init__(self, req: Dict[str, Any], default_count: int) -> None:
        fields = dict(protocol.EXECUTE_FIELDS)
        fields.update({k: v for k, v in req.items() if v is not None})
        self.id = str(req["id"])
        self.code = str(fields["code"])
        self.silent = bool(fields["silent"])
        store_history = fields["store_history"]
        self.store_history = bool(not self.silent if store_history is None else store_history)
        self.user_expressions: Dict[str, str] = dict(fields["user_expressions"] or {})
        self.allow_stdin = bool(fields["allow_stdin"])
        self.parent_header: Dict[str, Any] = dict(fields["parent_header"] or {})
        # A frontend's comm message to handle instead of code (see comms.run_comm).
        comm = fields["comm"]
        self.comm: Optional[Dict[str, Any]] = comm if isinstance(comm, dict) else None
        count = fields["execution_count"]
        self.execution_count = int(count) if count is not None else default_count
        self.events: List[Event] = []
        self.base = 0  # seq of events[0]; events before it were freed
        self.fetched = 0  # events with seq < fetched were returned once: never change them
        self.state = "queued"  # queued -> running -> finished
        self.done_seq = -1
        self.interrupt_requested = False
        self.waiting_input = False
        self.input_value: Optional[str] = None
        # Per-cell cap on stream text (characters), enforced here so a flood never
        # crosses the exec boundary; 0 = unlimited. One notice marks the cut.
        self.output_limit = max(0, int(fields["output_limit"] or 0))
        self.streamed = 0
        self.truncated = False
        # Pipelined polls (``ops.Requests._collect``): the ``next`` each recent request
        # id was answered with, and when the last answer went out.
        self.answered: Dict[str, int] = {}
        self.last_answer_at = 0.0

    @property
    def next_seq(self) -> int:
        return self.base + len(self.events)

    def add_stream(self, name: str, text: str) -> bool:
        """Record stream text (caller holds the cond); False when nothing was recorded.

        Text not yet returned to the kernel is merged into the last event of the same
        stream, so a flood of prints becomes few events.
        """
        if self.state == "finished" or self.truncated:
            return False
        if self.output_limit:
            room = self.output_limit - self.streamed
            if len(text) > room:
                text = text[: max(0, room)] + truncation_notice(self.output_limit)
                self.truncated = True
            self.streamed += len(text)
        last = self.events[-1] if self.events else None
        if (
            last is not None
            and last["type"] == protocol.EV_STREAM
            and last["name"] == name
            and last["seq"] >= self.fetched
            # take() may have joined it while it stayed unfetched (the size bound)
            and "_parts" in last
            and last["_len"] < MERGE_LIMIT
        ):
            last["_parts"].append(text)
            last["_len"] += len(text)
        else:
            event = {"seq": self.next_seq, "type": protocol.EV_STREAM, "name": name}
            event.update({"text": "", "_parts": [text], "_len": len(text)})
            self.events.append(event)
        return True

    def add(self, event: Event) -> bool:
        """Record a non-stream event (caller holds the cond); False once finished."""
        if self.state == "finished":
            return False
        event["seq"] = self.next_seq
        self.events.append(event)
        if event["type"] == protocol.EV_DONE:
            self.done_seq = event["seq"]
        return True

    def ends_mid_line(self) -> bool:
        """Whether the newest event is stream text still waiting for its newline
        (``print`` writes the text and the newline separately)."""
        last = self.events[-1] if self.events else None
        if last is None or last["type"] != protocol.EV_STREAM or "_parts" not in last:
            return False
        return not last["_parts"][-1].endswith("\n")

    def ready(self, since: int, until_done: bool) -> bool:
        """Whether an answer for a request waiting from ``since`` can go now."""
        if until_done:
            return self.state == "finished"
        return self.next_seq > since or self.state == "finished"

    def only_streams_from(self, since: int) -> bool:
        """Whether every event from ``since`` on is stream text, and less than half an
        answer's worth of it (caller holds the cond): then a poll may hold it back."""
        size = 0
        for event in self.events[max(0, since - self.base) :]:
            if event["type"] != protocol.EV_STREAM:
                return False
            size += event["_len"] if "_parts" in event else len(event["text"])
        return size < MAX_RESPONSE_BYTES // 2

    def take(self, since: int, acknowledged: Optional[int] = None) -> Dict[str, Any]:
        """The answer for "events from ``since``" (caller holds the cond).

        Events before ``acknowledged`` (default ``since``: what the kernel says it
        holds) that were returned once are freed; at most :data:`MAX_RESPONSE_BYTES`
        of events go in one answer.
        """
        held = since if acknowledged is None else min(since, acknowledged)
        drop = min(held, self.fetched) - self.base
        if drop > 0:
            del self.events[:drop]
            self.base += drop
        start = min(max(since, self.base), self.next_seq)
        out: List[Event] = []
        encoded: List[str] = []
        size = 0
        for event in self.events[start - self.base :]:
            if "_parts" in event:
                event["text"] = "".join(event.pop("_parts"))
                del event["_len"]
            # Serialized once: the size bound needs it, and the answer reuses it.
            text = encode_event(event)
            if out and size + len(text) > MAX_RESPONSE_BYTES:
                break
            out.append(event)
            encoded.append(text)
            size += len(text)
        nxt = start + len(out)
        self.fetched = max(self.fetched, nxt)
        done = 0 <= self.done_seq < nxt
        # ``more``: the size bound cut this answer short; the rest is already waiting.
        more = nxt < self.next_seq
        return {
            "ok": True,
            "events": out,
            "next": nxt,
            "done": done,
            "more": more,
            ENCODED_EVENTS: encoded,
        }


def background_log() -> Cell:
    """The pseudo-cell that collects what is produced while no cell runs.

    It never finishes, so its stream text merges and its cursor works as a cell's.
    """
    log = Cell({"id": "background"}, 0)
    log.state = "running"
    return log


def trim_background(log: Cell) -> None:
    """Drop the oldest events of ``log`` beyond :data:`KEEP_BACKGROUND_EVENTS`
    (caller holds the cond): a thread printing forever must not grow the agent."""
    extra = len(log.events) - KEEP_BACKGROUND_EVENTS
    if extra > 0:
        del log.events[:extra]
        log.base += extra
        log.fetched = max(log.fetched, log.base)


class Call:
    """A function the main thread runs for a server thread (complete, inspect, …)."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self.finished = threading.Event()

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:  # reported to the requester, never kills the loop
            self.error = exc
        finally:
            self.finished.set()


class WorkQueue:
    """Cells and calls for the main thread's event loop, put there from any thread.

    :meth:`put` wakes the loop itself (``call_soon_threadsafe``), so a cell's way from
    the server thread that received it to the loop is one thread switch. (A thread
    blocked on a ``queue.Queue`` that handed each item on to the loop made it two, on
    every cell's path.) Items put before the loop exists wait for :meth:`bind`.
    """

    def __init__(self) -> None:
        self._items: Deque[Any] = collections.deque()
        self._lock = threading.Lock()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._waiter: Optional[asyncio.Future[None]] = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve from ``loop`` (the main thread's, before the first :meth:`get`)."""
        with self._lock:
            self._loop = loop

    def put(self, item: Any) -> None:
        with self._lock:
            self._items.append(item)
            loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._wake)
            except RuntimeError:
                pass  # the loop is closed: the agent is exiting

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> Any:
        """The next item, in the order they were put (on the bound loop only)."""
        assert self._loop is not None
        while True:
            with self._lock:
                if self._items:
                    return self._items.popleft()
            # A put() from now on schedules _wake after this coroutine awaits (both run
            # on this loop), so no wake-up is lost.
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
