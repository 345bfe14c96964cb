"""Every request the kernel sends to the in-sandbox agent, built in one place (no I/O).

Who calls what, and when: the kernel turns an ``execute_request`` (or a frontend's comm
message) into a :class:`CellRequest`; the session sends :func:`execute_request` for it,
then :func:`poll_request` until the ``done`` event; interrupts, ``input()`` answers and
the namespace's questions (complete, inspect, …) are :func:`interrupt_request`,
:func:`input_reply` and :func:`query`. The field and event names come from the agent's
own description, ``modbox_kernel/agent/inside/protocol.py``, so both sides (and the
tests, which build their requests here too) spell them once. ``docs/agent-protocol.md``
describes the protocol in prose.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from .agent.inside import protocol as names
from .agent.inside.protocol import (
    COMM_EVENTS,
    EV_DONE,
    EV_ERROR,
    EV_EXECUTE_RESULT,
    EV_INPUT_REQUEST,
    EV_STREAM,
    INPUT_EOF,
    OUTPUT_EVENTS,
    truncation_notice,
)

__all__ = [
    "COMM_EVENTS",
    "EV_DONE",
    "EV_ERROR",
    "EV_EXECUTE_RESULT",
    "EV_INPUT_REQUEST",
    "EV_STREAM",
    "INPUT_EOF",
    "OUTPUT_EVENTS",
    "CellRequest",
    "background_request",
    "execute_request",
    "input_reply",
    "interrupt_request",
    "poll_request",
    "query",
    "shutdown_request",
    "truncation_notice",
]


@dataclass
class CellRequest:
    """One execute_request (or comm message), as the agent needs it."""

    code: str
    silent: bool = False
    store_history: bool = True
    user_expressions: dict[str, str] = field(default_factory=dict)
    allow_stdin: bool = False
    execution_count: int = 1
    output_limit: int = 0  # bytes of stream text per cell; 0 = unlimited
    cell_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # The frontend's request header (msg_id, msg_type, session): ipywidgets' Output
    # widget asks for it to claim the output of the request that is running.
    parent_header: dict[str, Any] = field(default_factory=dict)
    # A frontend's comm message (msg_type, content, metadata, base64 buffers) for the
    # sandbox's comms, handled instead of code (the agent's ``comms.run_comm``).
    comm: dict[str, Any] | None = None


def header_of(message: Any) -> dict[str, Any]:
    """The parts of a Jupyter request's header the sandbox may see (``parent_header``:
    no signature, no date)."""
    header = message.get("header", {}) if isinstance(message, dict) else {}
    return {k: str(header[k]) for k in ("msg_id", "msg_type", "session") if k in header}


def execute_request(cell: CellRequest, *, wait: float, since: int = 0) -> dict[str, Any]:
    """Submit ``cell``; the answer waits up to ``wait`` s for it to finish."""
    payload: dict[str, Any] = {
        "op": names.OP_EXECUTE,
        "id": cell.cell_id,
        "code": cell.code,
        "silent": cell.silent,
        "store_history": cell.store_history,
        "user_expressions": cell.user_expressions,
        "allow_stdin": cell.allow_stdin,
        "execution_count": cell.execution_count,
        "output_limit": cell.output_limit,
        "parent_header": cell.parent_header,
        "wait": wait,
        "since": since,
    }
    if cell.comm is not None:
        payload["comm"] = cell.comm
    return payload


def poll_request(
    cell_id: str,
    *,
    since: int,
    wait: float,
    rid: str | None = None,
    after: str | None = None,
    coalesce: float = 0.0,
) -> dict[str, Any]:
    """The events of cell ``cell_id`` from number ``since`` on, waiting up to ``wait`` s.

    Pipelined (``docs/agent-protocol.md``): ``rid`` names this request, ``after`` the
    earlier one it follows (it goes on where that one's answer ended), and
    ``coalesce`` holds stream text back until that long after the previous answer.
    """
    payload: dict[str, Any] = {"op": names.OP_POLL, "id": cell_id, "since": since, "wait": wait}
    if rid is not None:
        payload["rid"] = rid
    if after is not None:
        payload["after"] = after
    if coalesce:
        payload["coalesce"] = coalesce
    return payload


def background_request(*, since: int, wait: float) -> dict[str, Any]:
    """What the sandbox produced while no cell ran, from event ``since`` on."""
    return {"op": names.OP_BACKGROUND, "since": since, "wait": wait}


def debug_events_request(*, since: int, wait: float) -> dict[str, Any]:
    """debugpy's events in the sandbox from event ``since`` on (the debugger's log)."""
    return {"op": names.OP_DEBUG_EVENTS, "since": since, "wait": wait}


def unseen_events(answer: dict[str, Any], since: int) -> tuple[list[dict[str, Any]], int]:
    """The events of a cursor answer (``poll``, ``background``, ``debug_events``) from
    ``since`` on, and the cursor after them: a resent request repeats events, and those
    already relayed are left out."""
    fresh = []
    for event in answer.get("events", []):
        seq = int(event.get("seq", since))
        if seq >= since:
            fresh.append(event)
            since = seq + 1
    return fresh, max(since, int(answer.get("next", since)))


def interrupt_request(cell_id: str) -> dict[str, Any]:
    """Raise KeyboardInterrupt in cell ``cell_id`` if it runs (a queued one never runs)."""
    return {"op": names.OP_INTERRUPT, "id": cell_id}


def input_reply(cell_id: str, value: str) -> dict[str, Any]:
    """The frontend's answer to the cell's ``input_request`` (:data:`INPUT_EOF`: EOF)."""
    return {"op": names.OP_INPUT_REPLY, "id": cell_id, "value": value}


def query(op: str, **fields: Any) -> dict[str, Any]:
    """complete / inspect / is_complete / history / comm_info / info, with its fields."""
    if op not in names.QUERY_OPS:
        raise ValueError(f"{op!r} is not a query op of the agent protocol")
    return {"op": op, **fields}


def shutdown_request() -> dict[str, Any]:
    """Stop the agent (its running cell dies with it)."""
    return {"op": names.OP_SHUTDOWN}
