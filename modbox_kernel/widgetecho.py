"""Holds a cell's reply until the client has echoed what an Output widget captured.

A frontend that renders an ipywidgets ``Output`` widget sends the kernel the widget's
new ``outputs`` (a ``comm_msg`` "update") for each output the widget captured: the
kernel side learns that way what the widget shows. nbclient (and so papermill,
nbconvert and Voila) sends that echo while it is still waiting for the cell's
``execute_reply`` on the same shell socket, and jupyter_client's ``Session.send``
writes it through a plain shadow of the asyncio socket. That write takes in the
socket's pending wake-up; if the reply had just arrived, pyzmq's asyncio poll never
hears of it, and the client waits out its cell timeout (nbclient's default has none:
it waits for ever). The stock ipykernel kernel hits this too (nbclient issue 312);
measured on this project's two-core VM with both cores busy, python3 stalled in 5 of
10 runs of ``notebooks/output_widget.ipynb``. A gap of time before the reply only
makes it rarer; this makes it impossible for such a client.

The rule: an execute reply goes out only once the client has sent one echo for each
output that it routed into an Output widget during the request (as nbclient routes
them: the widget's ``msg_id`` names the request, and the output is a stream, display,
result or error, or a ``clear_output`` without ``wait``). Its last write on the shell
socket is then over before the reply can arrive. Clients that do not echo per output
(JupyterLab sends its echo without a parent header, and through jupyter_server's
streams, which do not lose wake-ups) are recognised by their first echo and never
waited for; a client that does not echo at all costs one wait of
:data:`ECHO_WAIT` seconds, after which it is not waited for again.

Who calls what, and when: the kernel's IOPub publisher calls :meth:`published` for
every message it sends, the kernel's comm handler calls :meth:`received` for every
comm message of the frontend (before anything else, since it runs beside the cell),
and ``do_execute`` awaits :meth:`settled` with the request's msg_id before returning
the reply.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any

log = logging.getLogger(__name__)

# The longest a reply waits for echoes. nbclient echoes within milliseconds; a client
# that has never echoed is waited for once, then not again.
ECHO_WAIT = 1.0
# Requests remembered (outputs captured outside a reply's wait: a comm handler's, a
# background thread's after its cell): the oldest are forgotten.
KEEP = 200
# IOPub messages nbclient hands to an Output widget capturing their request. Anything
# else (status, execute_input, update_display_data, comm messages) is not captured.
_CAPTURED = frozenset({"stream", "display_data", "execute_result", "error"})


def _parent_id(header: Any) -> str:
    return str(header.get("msg_id", "")) if isinstance(header, dict) else ""


class OutputWidgetEchoes:
    """Counts captured outputs and the client's echoes of them, per request."""

    def __init__(self, wait: float = ECHO_WAIT) -> None:
        self._wait = wait
        # comm_id -> the request whose output the widget captures now (its msg_id).
        self._capturing: dict[str, str] = {}
        # msg_id -> [outputs captured, echoes received].
        self._counts: collections.OrderedDict[str, list[int]] = collections.OrderedDict()
        self._changed = asyncio.Event()
        # None: not known yet; True: echoes each output with its parent; False: does not.
        self.echoes: bool | None = None

    def published(self, msg_type: str, content: dict[str, Any], parent: dict[str, Any]) -> None:
        """One message the kernel sent on IOPub, under ``parent``."""
        if msg_type == "comm_msg":
            data = content.get("data")
            state = data.get("state") if isinstance(data, dict) else None
            if isinstance(state, dict) and "msg_id" in state:
                comm_id = str(content.get("comm_id", ""))
                if state["msg_id"]:
                    self._capturing[comm_id] = str(state["msg_id"])
                else:
                    self._capturing.pop(comm_id, None)
            return
        if msg_type == "comm_close":
            self._capturing.pop(str(content.get("comm_id", "")), None)
            return
        if not self._capturing:
            return
        captured = msg_type in _CAPTURED or (msg_type == "clear_output" and not content.get("wait"))
        msg_id = _parent_id(parent.get("header"))
        if captured and msg_id in self._capturing.values():
            self._count(msg_id)[0] += 1

    def received(self, message: dict[str, Any]) -> None:
        """One comm message from the frontend (its whole message dict)."""
        if message.get("header", {}).get("msg_type") != "comm_msg":
            return
        data = (message.get("content") or {}).get("data")
        state = data.get("state") if isinstance(data, dict) else None
        if not (isinstance(state, dict) and "outputs" in state):
            return
        msg_id = _parent_id(message.get("parent_header"))
        if not msg_id:
            if self.echoes is None:
                log.debug("the frontend echoes Output widgets without a parent: no waits")
                self.echoes = False
                self._changed.set()  # a reply waiting for this client goes now
            return
        self.echoes = True
        self._count(msg_id)[1] += 1
        self._changed.set()

    async def settled(self, msg_id: str) -> None:
        """Return once the client has echoed every output captured under ``msg_id``."""
        counts = self._counts.pop(msg_id, None)
        if counts is None or self.echoes is False or counts[1] >= counts[0]:
            return
        self._counts[msg_id] = counts
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._wait
        try:
            while counts[1] < counts[0] and self.echoes is not False:
                left = deadline - loop.time()
                if left <= 0:
                    if self.echoes is None:
                        log.debug("the frontend does not echo Output widgets: no waits")
                        self.echoes = False
                    return
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), left)
                except asyncio.TimeoutError:
                    pass
        finally:
            self._counts.pop(msg_id, None)

    def _count(self, msg_id: str) -> list[int]:
        counts = self._counts.get(msg_id)
        if counts is None:
            counts = self._counts[msg_id] = [0, 0]
            if len(self._counts) > KEEP:
                self._counts.popitem(last=False)
        return counts
