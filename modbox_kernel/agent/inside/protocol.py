"""The agent protocol's names: requests the kernel sends, events the agent answers with.

This is the one description both sides use. The agent reads requests with these field
names and defaults (``cells.Cell``); the kernel builds them with
``modbox_kernel.protocol``, which imports this module (it is stdlib-only and does no
I/O); the tests build theirs with the kernel's builders. ``docs/agent-protocol.md``
describes the same protocol in prose.
"""

from typing import Any, Dict, Tuple

# -- requests: ``{"op": <op>, ...fields}``

OP_EXECUTE = "execute"
OP_POLL = "poll"
OP_INTERRUPT = "interrupt"
OP_INPUT_REPLY = "input_reply"
OP_COMPLETE = "complete"
OP_INSPECT = "inspect"
OP_IS_COMPLETE = "is_complete"
OP_HISTORY = "history"
OP_COMM_INFO = "comm_info"
OP_INFO = "info"
OP_SHUTDOWN = "shutdown"
#: Sets environment variables, only before the first cell (a pooled agent's handover).
OP_ENVIRON = "environ"
#: Events produced while no cell runs (background threads, timers, comms), read with
#: the cursor of ``poll`` (``since``, ``wait``); the answer also carries ``epoch``, which
#: changes when the agent is replaced (its numbering starts again at 0).
OP_BACKGROUND = "background"
#: The working folder and its files (``workfiles``): enter it and track what cells
#: change there; what changed since the last look; read, list and write files.
OP_WORKDIR = "workdir"
OP_FILES = "files"
OP_READ = "read"
OP_LIST = "list"
OP_WRITE = "write"
#: The debugger: one Debug Adapter Protocol request (``request``) answered with its
#: response (``reply``); debugpy's events, read with the cursor of ``background``.
OP_DEBUG = "debug"
OP_DEBUG_EVENTS = "debug_events"
#: The sandbox's resource figures (memory, CPU, processes) for ``usage_request``.
OP_USAGE = "usage"

#: Ops answered with ``{"ok", "reply"}`` (the namespace's questions on the main
#: thread; the agent's info, usage and debugger on the server thread).
QUERY_OPS: Tuple[str, ...] = (
    OP_COMPLETE,
    OP_INSPECT,
    OP_IS_COMPLETE,
    OP_HISTORY,
    OP_COMM_INFO,
    OP_INFO,
    OP_DEBUG,
    OP_USAGE,
)

#: The fields of an ``execute`` request and the value the agent assumes when one is
#: missing. ``id`` is required; a missing ``store_history`` means ``not silent``; a
#: missing ``execution_count`` means one past the last cell the agent ran. ``wait`` and
#: ``since`` are the cursor of the answer (as in ``poll``), the rest describe the cell.
EXECUTE_FIELDS: Dict[str, Any] = {
    "id": None,
    "code": "",
    "silent": False,
    "store_history": None,
    "user_expressions": {},
    "allow_stdin": False,
    "execution_count": None,
    # Stream text per cell (characters) beyond which output is cut with one notice.
    "output_limit": 0,
    # The frontend's request header (msg_id, msg_type, session): ipywidgets' Output
    # widget asks for it to claim the output of the request that is running.
    "parent_header": {},
    # A frontend's comm message (msg_type, content, metadata, base64 buffers), handled
    # instead of code (see ``comms.run_comm``).
    "comm": None,
    "wait": 0.0,
    "since": 0,
}

#: The fields of a ``poll`` request.
POLL_FIELDS: Tuple[str, ...] = ("id", "since", "wait")

# -- events: ``{"seq": n, "type": <type>, ...the Jupyter message's content}``

EV_STREAM = "stream"
EV_DISPLAY_DATA = "display_data"
EV_UPDATE_DISPLAY_DATA = "update_display_data"
EV_EXECUTE_RESULT = "execute_result"
EV_ERROR = "error"
EV_CLEAR_OUTPUT = "clear_output"
EV_INPUT_REQUEST = "input_request"
EV_COMM_OPEN = "comm_open"
EV_COMM_MSG = "comm_msg"
EV_COMM_CLOSE = "comm_close"
EV_DONE = "done"
#: One of debugpy's events, as ``content`` (only in the ``debug_events`` log).
EV_DEBUG_EVENT = "debug_event"

#: Events that become IOPub messages of the same type and content.
OUTPUT_EVENTS: Tuple[str, ...] = (
    EV_DISPLAY_DATA,
    EV_UPDATE_DISPLAY_DATA,
    EV_EXECUTE_RESULT,
    EV_ERROR,
    EV_CLEAR_OUTPUT,
)
#: Comm events carry ``_metadata`` and base64 ``_buffers`` beside the content.
COMM_EVENTS: Tuple[str, ...] = (EV_COMM_OPEN, EV_COMM_MSG, EV_COMM_CLOSE)

#: What an ``input_reply`` value of this makes ``input()`` raise: EOFError, as
#: ipykernel does for Ctrl-D.
INPUT_EOF = "\x04"


def truncation_notice(limit: int) -> str:
    """The one line that replaces a cell's stream output beyond ``output_limit``.

    The agent cuts there; the kernel's own guard behind it uses the same words, so the
    user sees one notice whichever side cut.
    """
    return (
        f"\n[Modbox: output of this cell truncated after {limit} bytes; "
        "set ModboxKernel.output_limit / MODBOX_OUTPUT_LIMIT to change the limit]\n"
    )
