"""The agent's answers to requests: one ``op_<name>`` method per op of ``protocol``.

``server`` calls :meth:`Requests.handle_line` on a server thread for each connection.
Cells are queued for the main thread (``core.Agent.main_loop``) and their events read
with the cursor of ``cells``; complete/inspect/is_complete/history run on the main
thread through ``Agent.call_on_main``, since the namespace is not thread-safe.
"""

from __future__ import annotations

import hmac
import logging
import os
import signal
import time
from typing import TYPE_CHECKING, Any, Callable, Collection, Dict

from . import comms, protocol, workfiles
from .cells import KEEP_CELLS, Cell
from .wire import MAX_WAIT_SECONDS, decode_request, snapshot

if TYPE_CHECKING:
    from .core import Agent
    from .runner import Runner

log = logging.getLogger("modbox.agent")

#: How long a poll woken by text without a newline waits for the rest of the line.
PARTIAL_LINE_WAIT = 0.005
#: Upper bound of a poll's ``coalesce``.
MAX_COALESCE_SECONDS = 0.1
#: Request ids of a cell whose answer positions are remembered (a pipeline is 2 deep).
KEEP_ANSWERED = 16


class Requests:
    """Answers the kernel's requests for one :class:`~.core.Agent`."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def handle_line(self, line: bytes) -> Dict[str, Any]:
        """``<token> <body>``: check the token, decode the body, answer it."""
        text = line.decode("ascii", "replace").strip()
        token, _, body = text.partition(" ")
        if not hmac.compare_digest(token.encode(), self.agent.token.encode()):
            return {"ok": False, "error": "bad token"}
        req = decode_request(body.strip())
        if not isinstance(req, dict):
            return {"ok": False, "error": "the request is not a JSON object"}
        return self.handle_request(req)

    def handle_request(self, req: Dict[str, Any]) -> Dict[str, Any]:
        op = req.get("op")
        handler = getattr(self, f"op_{op}", None) if isinstance(op, str) else None
        if handler is None:
            return {"ok": False, "error": f"unknown op {op!r}"}
        if op in (protocol.OP_BACKGROUND, protocol.OP_DEBUG_EVENTS):
            # The kernel keeps this poll open all the time; it only waits on the
            # condition, so it must not keep the jedi warm-up parked.
            background: Dict[str, Any] = handler(req)
            return background
        with self.agent.gate.busy():
            result: Dict[str, Any] = handler(req)
        return result

    # -- cells
    def op_execute(self, req: Dict[str, Any]) -> Dict[str, Any]:
        if "id" not in req:
            return {"ok": False, "error": "execute needs an id"}
        agent = self.agent
        cid = str(req["id"])
        with agent.cond:
            cell = agent.cells.get(cid)
            known = cell is not None or cid in agent.forgotten
            if not known:
                agent.pristine = False
                cell = Cell(req, agent.last_count + 1)
                agent.cells[cid] = cell
                self._forget_old_cells()
                agent.work.put(cell)
        if cell is None:
            return {"ok": False, "error": f"cell {cid} finished long ago; its events are gone"}
        if known:  # a resent execute never runs the code again: it is a poll
            return self._collect(cell, req, until_done=False)
        return self._collect(cell, req, until_done=True)

    def op_poll(self, req: Dict[str, Any]) -> Dict[str, Any]:
        with self.agent.cond:
            cell = self.agent.cells.get(str(req.get("id")))
        if cell is None:
            return {"ok": False, "error": f"unknown cell id {req.get('id')!r}"}
        return self._collect(cell, req, until_done=False)

    def op_background(self, req: Dict[str, Any]) -> Dict[str, Any]:
        """Events produced while no cell ran, from ``since`` (waits up to ``wait`` s)."""
        return self._read_log(self.agent.background, req)

    def _read_log(self, log: Cell, req: Dict[str, Any]) -> Dict[str, Any]:
        """A cursor answer on a log that never finishes, with the agent's ``epoch``
        (which tells a replaced agent, numbering from 0 again, apart)."""
        answer = self._collect(log, req, until_done=False)
        answer["epoch"] = self.agent.epoch
        return answer

    # -- the debugger (``debugging``)
    def op_debug(self, req: Dict[str, Any]) -> Dict[str, Any]:
        request = req.get("request")
        if not isinstance(request, dict):
            return {"ok": False, "error": "debug needs a 'request' object"}
        return {"ok": True, "reply": self.agent.debugger.handle(request)}

    def op_debug_events(self, req: Dict[str, Any]) -> Dict[str, Any]:
        """debugpy's events from ``since`` (waits up to ``wait`` s), as ``background``."""
        return self._read_log(self.agent.debugger.log, req)

    def _forget_old_cells(self) -> None:
        cells = self.agent.cells
        while len(cells) > KEEP_CELLS:
            oldest_id, oldest = next(iter(cells.items()))
            if oldest.state != "finished":
                return
            del cells[oldest_id]
            self.agent.forgotten.add(oldest_id)

    def _collect(self, cell: Cell, req: Dict[str, Any], until_done: bool) -> Dict[str, Any]:
        """Wait (up to ``wait`` s) until there is something from ``since``; answer it.

        Pipelined polls (``docs/agent-protocol.md``, "Pipelined polls"): a request with
        ``after`` (the ``rid`` of the kernel's previous, still unanswered request)
        first waits for that one's answer and goes on from where it ended; ``since``
        stays what the kernel holds, so nothing it may still ask again is freed. With
        ``coalesce`` (s), stream text alone is held back until that long after the
        previous answer, so a flood of prints becomes few answers.
        """
        since = max(0, int(req.get("since") or 0))
        wait = min(max(0.0, float(req.get("wait") or 0)), MAX_WAIT_SECONDS)
        coalesce = min(max(0.0, float(req.get("coalesce") or 0)), MAX_COALESCE_SECONDS)
        after, rid = req.get("after"), req.get("rid")
        deadline = time.monotonic() + wait
        cond = self.agent.cond
        with cond:
            start = since
            if isinstance(after, str):
                # If the predecessor never arrives (lost on the way), answer from since.
                while after not in cell.answered and cell.state != "finished":
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    cond.wait(remaining)
                start = max(since, cell.answered.get(after, since))
            while True:
                remaining = deadline - time.monotonic()
                if cell.ready(start, until_done) or remaining <= 0:
                    break
                cond.wait(remaining)
            # Woken by the first part of a print (its pieces and newline are separate
            # writes, microseconds apart): answering now would make two outputs of one
            # print in a saved notebook, where the stock kernel saves one.
            line_by = time.monotonic() + PARTIAL_LINE_WAIT
            while not until_done and cell.state != "finished" and cell.ends_mid_line():
                remaining = line_by - time.monotonic()
                if remaining <= 0:
                    break
                cond.wait(remaining)
            hold = min(cell.last_answer_at + coalesce, deadline)
            while (
                coalesce
                and not until_done
                and cell.state != "finished"
                and cell.only_streams_from(start)
            ):
                remaining = hold - time.monotonic()
                if remaining <= 0:
                    break
                cond.wait(remaining)
            answer = cell.take(start, acknowledged=since)
            cell.last_answer_at = time.monotonic()
            if isinstance(rid, str):
                # The first answer to this rid stays: a late copy of a resent request
                # reaches further than the answer the kernel may have used.
                cell.answered.setdefault(rid, int(answer["next"]))
                while len(cell.answered) > KEEP_ANSWERED:
                    del cell.answered[next(iter(cell.answered))]
                cond.notify_all()  # the request queued after this one goes on
            return answer

    def op_interrupt(self, req: Dict[str, Any]) -> Dict[str, Any]:
        agent = self.agent
        with agent.cond:
            cell = agent.cells.get(str(req.get("id")))
            if cell is None or cell.state == "finished":
                return {"ok": True, "delivered": False}
            cell.interrupt_requested = True
            running = cell.state == "running" and agent.in_user_code and agent.current is cell
        if running:
            # pthread_kill, not kill: the main thread must be the one whose sleep/read
            # gets EINTR, or the KeyboardInterrupt waits for that call to return.
            # Once debugpy is loaded it may hold the signal's landing place even
            # between debugging sessions (its tracing stays): the retrying path then.
            if agent.debugger.loaded:
                agent.debugger.interrupt()
            else:
                signal.pthread_kill(agent.main_ident, signal.SIGINT)
            _interrupt_children(spare=agent.debugger.adapter_pids)
        # A queued cell sees interrupt_requested when it starts and does not run.
        return {"ok": True, "delivered": True}

    def op_input_reply(self, req: Dict[str, Any]) -> Dict[str, Any]:
        agent = self.agent
        with agent.cond:
            cell = agent.cells.get(str(req.get("id")))
            if cell is None or not cell.waiting_input or cell.input_value is not None:
                return {"ok": False, "error": f"cell {req.get('id')!r} is not waiting for input"}
            cell.input_value = str(req.get("value", ""))
            agent.cond.notify_all()
        return {"ok": True}

    # -- questions about the namespace
    def _meta(self, fn: Callable[[Runner], Dict[str, Any]]) -> Dict[str, Any]:
        agent = self.agent

        def call() -> Dict[str, Any]:
            assert agent.runner is not None
            return fn(agent.runner)

        try:
            reply = agent.call_on_main(call)
        except TimeoutError as exc:
            return {"ok": False, "error": str(exc)}
        return {"ok": True, "reply": snapshot(reply)}

    def op_comm_info(self, req: Dict[str, Any]) -> Dict[str, Any]:
        reply = comms.comm_info(self.agent.comm_manager, req.get("target_name"))
        return {"ok": True, "reply": reply}

    def op_complete(self, req: Dict[str, Any]) -> Dict[str, Any]:
        code = str(req.get("code", ""))
        pos = req.get("cursor_pos")
        cursor = len(code) if pos is None else int(pos)
        agent = self.agent

        def complete(r: Any) -> Any:
            # jedi's first completion costs 1-2 s of CPU in a fresh sandbox, more than
            # frontends wait (JupyterLab drops an answer after 1 s): until the warm-up
            # has done it, answer without jedi (IPython's own matchers: names,
            # attributes, keys, paths, in milliseconds). That also keeps jedi, which is
            # not thread-safe, to the warm-up thread, parked while this request runs.
            warm = agent.jedi_warm_up
            if warm is None or warm.is_alive():
                agent.start_jedi_warm_up()  # for the completions after this one
                return r.complete(code, cursor, quick=True)
            return r.complete(code, cursor)

        return self._meta(complete)

    def op_inspect(self, req: Dict[str, Any]) -> Dict[str, Any]:
        code = str(req.get("code", ""))
        pos = req.get("cursor_pos")
        cursor = len(code) if pos is None else int(pos)
        level = int(req.get("detail_level") or 0)
        return self._meta(lambda r: r.inspect(code, cursor, level))

    def op_is_complete(self, req: Dict[str, Any]) -> Dict[str, Any]:
        code = str(req.get("code", ""))
        return self._meta(lambda r: r.is_complete(code))

    def op_history(self, req: Dict[str, Any]) -> Dict[str, Any]:
        return self._meta(lambda r: {"history": r.history(req)})

    # -- the agent itself
    def op_info(self, req: Dict[str, Any]) -> Dict[str, Any]:
        return {"ok": True, "reply": self.agent.info()}

    def op_usage(self, req: Dict[str, Any]) -> Dict[str, Any]:
        return {"ok": True, "reply": self.agent.resources.usage()}

    def op_environ(self, req: Dict[str, Any]) -> Dict[str, Any]:
        """Set environment variables: a service that started this agent in advance (a
        pool) passes the creator's ``env_vars`` here when it hands the sandbox over, so
        the notebook sees them as if the agent had been started after the create."""
        values = req.get("set")
        if not isinstance(values, dict) or not self.agent.pristine:
            return {"ok": False, "error": "environ needs a 'set' object, before any cell"}
        os.environ.update({str(k): str(v) for k, v in values.items()})
        return {"ok": True}

    # -- the working folder and its files (``workfiles``)
    def op_workdir(self, req: Dict[str, Any]) -> Dict[str, Any]:
        with self.agent.cond:
            if self.agent.current is not None:
                return {"ok": False, "error": "workdir while a cell runs"}
        return workfiles.change_dir(req, self.agent.files)

    def op_files(self, req: Dict[str, Any]) -> Dict[str, Any]:
        return {"ok": True, "files": self.agent.files.changes()}

    def op_read(self, req: Dict[str, Any]) -> Dict[str, Any]:
        return workfiles.read_files(req)

    def op_list(self, req: Dict[str, Any]) -> Dict[str, Any]:
        return workfiles.list_files(req)

    def op_write(self, req: Dict[str, Any]) -> Dict[str, Any]:
        return workfiles.write_file(req, self.agent.files)

    def op_shutdown(self, req: Dict[str, Any]) -> Dict[str, Any]:
        return {"ok": True, "_then_exit": True}


def _interrupt_children(spare: Collection[int] = ()) -> None:
    """SIGINT the cell's child processes, as ipykernel's ``killpg`` of its group does.

    ``os.system('sleep 30')`` ignores SIGINT in the caller while it waits, so only the
    child can end it. Background jobs started with ``&`` ignore SIGINT (POSIX), as they
    do under the local kernel. The agent itself is left out: it got its own signal.
    """
    me, group = os.getpid(), os.getpgrp()
    try:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return
    for pid in pids:
        if pid == me or pid in spare:  # spare: debugpy's adapter, which must live on
            continue
        try:
            if os.getpgid(pid) == group:
                os.kill(pid, signal.SIGINT)
        except OSError:
            pass
