"""Background warm-ups that must never slow the user down: the gate and jedi's.

``core.Agent`` owns one :class:`Gate`; the request handlers (``server``) and the cell
runner hold :meth:`Gate.busy`; :func:`warm_up_jedi` runs on a background thread started
by ``core.Agent.start_jedi_warm_up`` at the first completion, and waits on the gate.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
import threading
import time
from typing import Any, Iterator

log = logging.getLogger("modbox.agent")


class Gate:
    """Lets background work (the jedi warm-up) run only while the agent is quiet.

    The background thread calls :meth:`wait` at safe points, which returns once nothing
    has been busy for :data:`QUIET_SECONDS`: a notebook run cell after cell (nbclient)
    leaves no such gap and pays nothing, a person at the keyboard leaves plenty.
    """

    QUIET_SECONDS = 0.5

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._busy = 0
        self._quiet_since = time.monotonic()

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        with self._cond:
            self._busy += 1
        try:
            yield
        finally:
            with self._cond:
                self._busy -= 1
                self._quiet_since = time.monotonic()
                self._cond.notify_all()

    def closed(self) -> bool:
        """Whether work is in progress now (cheap; a racy read is fine: it is a hint)."""
        return self._busy > 0

    def wait(self) -> None:
        with self._cond:
            while True:
                if self._busy:
                    self._cond.wait()
                    continue
                left = self._quiet_since + self.QUIET_SECONDS - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)


def warm_up_jedi(gate: Gate) -> None:
    """Run jedi's first completion (1-2 s of CPU in a fresh sandbox) on a background thread.

    It starts once the agent is quiet and steps aside whenever it works again (a
    request is served or a cell runs). A CPU-bound thread makes every other thread wait
    up to the GIL switch interval after each blocking call it makes: run alongside, it
    stretched a user's first interrupt (signal, traceback formatting, events: hundreds
    of small reads) to over a second and added about 50 ms to each of the first cells.
    """
    packages = tuple(
        os.path.join(os.path.dirname(spec.origin), "")
        for spec in map(importlib.util.find_spec, ("jedi", "parso"))
        if spec is not None and spec.origin
    )

    def step_aside(frame: Any, event: str, arg: Any) -> None:
        # Called at each Python call made by this thread only. Waiting is safe only in
        # jedi's or parso's own code (they take no locks) and outside any import: an
        # import holds its module's lock and, while finding a spec, the global import
        # lock, so the first cell's own lazy import (IPython's run_cell has one)
        # would wait forever. Other libraries' code may hold locks too (logging's).
        if not gate.closed() or not frame.f_code.co_filename.startswith(packages):
            return
        f = frame
        while f is not None:
            if f.f_code.co_filename.startswith("<frozen importlib"):
                return
            f = f.f_back
        gate.wait()

    gate.wait()  # not during the first cells, which usually follow the start at once
    sys.settrace(step_aside)
    try:
        import jedi

        jedi.Interpreter("zi", [{}]).complete()
    except Exception:  # only an optimisation
        log.debug("jedi warm-up failed", exc_info=True)
    finally:
        sys.settrace(None)
