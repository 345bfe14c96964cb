"""A frontend's comm messages on their way to the sandbox's comms, in arrival order.

ipykernel handles a comm message that arrives while a cell runs at once, beside the
cell (a widget's echo must not wait for a long cell), and then restores the parent of
the messages before it. In the sandbox a comm message waits behind the running cell,
so awaiting it there would hold the shell handler past the end of that cell -- and
ipykernel's restore would then hand a stale parent to the *next* request (its idle
status went out under an old request, and nbclient waited out its IOPub timeout).

Who calls what, and when: the kernel's comm handler calls :meth:`CommForwarder.forward`
for each comm message. While no cell runs (and none is queued) it is sent and awaited, so what its
handlers print lands between the message's busy and idle, as under ipykernel. While a
cell runs it is queued and the handler returns at once; one task sends the queue in
order, each message's output published under that message (its own relay, with an
explicit parent). Before a cell runs, the kernel awaits :meth:`drained`, so a comm
message is never overtaken by a later cell.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import protocol
from .relay import OutputRelay

if TYPE_CHECKING:
    from .session import SandboxSession

log = logging.getLogger(__name__)

#: relay_for(parent): a relay publishing under ``parent`` (the comm message).
RelayFor = Callable[[dict[str, Any]], OutputRelay]


class ParentOrder:
    """Tells ipykernel's restore of a stale parent from a real new parent.

    After a comm message handled beside a running cell, ipykernel sets back the parent
    it saw when the message arrived. That handler awaits a task, and meanwhile the cell
    may have ended and the next request begun (with our bursts of events at the end of
    a cell, it often has): the restore would then put the finished cell's parent under
    the new request, whose idle status a client never sees. The kernel's ``set_parent``
    asks :meth:`stale` and skips such a restore.
    """

    KEEP = 1000

    def __init__(self) -> None:
        self._order: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._count = 0
        self._newest_execute = -1

    def stale(self, parent: Any) -> bool:
        """True for a parent seen before and older than an execute_request since."""
        header = parent.get("header", {}) if isinstance(parent, dict) else {}
        msg_id = str(header.get("msg_id", ""))
        if not msg_id:
            return False
        seen = self._order.get(msg_id)
        if seen is not None:
            return seen < self._newest_execute
        self._count += 1
        self._order[msg_id] = self._count
        if len(self._order) > self.KEEP:
            self._order.popitem(last=False)
        if header.get("msg_type") == "execute_request":
            self._newest_execute = self._count
        return False


class CommForwarder:
    """Sends comm messages to the sandbox one at a time, in the order they came."""

    def __init__(self, session: SandboxSession, relay_for: RelayFor) -> None:
        self._session = session
        self._relay_for = relay_for
        self._queue: asyncio.Queue[tuple[protocol.CellRequest, dict[str, Any]]] | None = None
        self._worker: asyncio.Task[None] | None = None
        # Queued messages not yet handled, the one being sent included: while there
        # are any, a new message queues behind them even if no cell runs.
        self._backlog = 0

    async def forward(self, request: protocol.CellRequest, parent: dict[str, Any]) -> None:
        """Send ``request`` (the comm message ``parent``) now, or queue it behind the cell."""
        if self._session.running_cell is None and not self._backlog:
            await self._send(request, parent)
            return
        if self._queue is None:
            self._queue = asyncio.Queue()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.ensure_future(self._work(self._queue))
        self._backlog += 1
        self._queue.put_nowait((request, parent))

    async def drained(self) -> None:
        """Return once every queued comm message has been handled in the sandbox."""
        if self._queue is not None:
            await self._queue.join()

    async def _work(
        self, queue: asyncio.Queue[tuple[protocol.CellRequest, dict[str, Any]]]
    ) -> None:
        while True:
            request, parent = await queue.get()
            try:
                await self._send(request, parent)
            finally:
                self._backlog -= 1
                queue.task_done()

    async def _send(self, request: protocol.CellRequest, parent: dict[str, Any]) -> None:
        relay = self._relay_for(parent)
        try:
            await self._session.execute(request, relay.event)
        except Exception as exc:  # a lost sandbox is reported by the next cell
            log.warning("a comm message could not reach the sandbox: %s", exc)
        relay.flush()
