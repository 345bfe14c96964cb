"""Tracebacks without the agent's own frames: the user should see their code, not ours.

``format_exception`` is for exceptions no runner formatted (the fallback runner, an
interrupt that escaped); ``without_agent_tail`` is for the IPython runner, whose
KeyboardInterrupt is raised by the agent's SIGINT handler and so ends in an agent frame.
"""

from __future__ import annotations

import traceback
import types
from typing import Any, Dict

from .location import is_agent_file


def format_exception(exc: BaseException) -> Dict[str, Any]:
    """ename/evalue/traceback for an exception, the agent's leading frames left out."""
    tb = exc.__traceback__
    while tb is not None and is_agent_file(tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    lines = traceback.format_exception(type(exc), exc, tb)
    return {
        "ename": type(exc).__name__,
        "evalue": str(exc),
        "traceback": [chunk.rstrip("\n") for chunk in lines],
    }


def without_agent_tail(tb: Any) -> Any:
    """``tb`` without the trailing entries that are frames of the agent's code."""
    entries = []
    while tb is not None:
        entries.append(tb)
        tb = tb.tb_next
    while entries and is_agent_file(entries[-1].tb_frame.f_code.co_filename):
        entries.pop()
    rebuilt = None
    for entry in reversed(entries):
        rebuilt = types.TracebackType(rebuilt, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return rebuilt
