"""``input()`` and ``getpass()`` in user code: ask the kernel, wait for ``input_reply``.

``core.Agent._run_cell`` wraps each cell in :func:`stdin_patched`; the replacement
functions emit an ``input_request`` event and wait (main thread) until ``ops`` stores
the kernel's ``input_reply`` in the cell.
"""

from __future__ import annotations

import builtins
import contextlib
import getpass
from typing import TYPE_CHECKING, Any, Iterator

from . import protocol
from .runner import StdinNotImplementedError

if TYPE_CHECKING:
    from .core import Agent

RAW_INPUT_REFUSED = "raw_input was called, but this frontend does not support input requests."
GETPASS_REFUSED = "getpass was called, but this frontend does not support input requests."


def read_input(agent: Agent, prompt: Any, password: bool) -> str:
    """Send an ``input_request`` for the running cell and wait for the answer."""
    cell = agent.current
    assert cell is not None
    with agent.cond:
        cell.input_value = None
        cell.waiting_input = True
    agent.emit({"type": protocol.EV_INPUT_REQUEST, "prompt": str(prompt), "password": password})
    try:
        with agent.cond:
            while cell.input_value is None:
                agent.cond.wait(0.2)
            value = cell.input_value
    except KeyboardInterrupt:
        raise KeyboardInterrupt("Interrupted by user") from None
    finally:
        with agent.cond:
            cell.waiting_input = False
            cell.input_value = None
    if value == protocol.INPUT_EOF:  # what ipykernel treats as EOF (Ctrl-D)
        raise EOFError
    return value


@contextlib.contextmanager
def stdin_patched(agent: Agent) -> Iterator[None]:
    """``input``/``getpass`` that ask the frontend, or refuse as ipykernel does."""
    saved_input, saved_getpass = builtins.input, getpass.getpass
    cell = agent.current
    allowed = cell is not None and cell.allow_stdin
    refused = agent.runner.stdin_error if agent.runner else StdinNotImplementedError

    # Named and shaped like ipykernel's replacements: when stdin is refused the
    # traceback's last frame is this small function, as it is ipykernel's there.
    def raw_input(prompt: Any = "") -> str:
        __tracebackhide__ = True  # shown only when it is the raising frame
        if not allowed:
            raise refused(RAW_INPUT_REFUSED)
        return read_input(agent, prompt, False)

    def getpass_(prompt: Any = "", stream: Any = None, **kwargs: Any) -> str:
        __tracebackhide__ = True
        if not allowed:
            raise refused(GETPASS_REFUSED)
        return read_input(agent, prompt, True)

    builtins.input = raw_input
    getpass.getpass = getpass_
    try:
        yield
    finally:
        builtins.input, getpass.getpass = saved_input, saved_getpass
