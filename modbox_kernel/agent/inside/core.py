"""The agent's state and its main thread: cells, events, interrupts, the runner.

``daemon.run_daemon`` builds one :class:`Agent`, installs its SIGINT handler and output
capture, then calls :meth:`Agent.setup_runner` and :meth:`Agent.main_loop` on the main
thread, which runs cells and meta calls in order. Server threads (``ops``) queue cells
and read their events; the output reader (``capture``) calls :meth:`append_stream`;
user code's display machinery calls :meth:`emit`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import re
import secrets
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterator, Optional

from . import comms
from .capture import OutputCapture
from .cells import Call, Cell, WorkQueue, background_log, trim_background
from .dapclient import untraced
from .debugging import Debugger, unavailable_reason
from .fallback import FallbackRunner
from .ipython_runner import make_ipython_runner
from .location import agent_version
from .resources import Resources
from .runner import Runner
from .state import remove_state_files
from .stdin import stdin_patched
from .tracebacks import format_exception
from .warmup import Gate, warm_up_jedi
from .wire import Event, snapshot
from .workfiles import Tracker

#: How long a complete/inspect/history request waits for the main thread.
META_TIMEOUT_SECONDS = 10.0

log = logging.getLogger("modbox.agent")


class Agent:
    """The daemon's state: cells and their events, the work queue, the runner."""

    def __init__(self, state_dir: str, log_fd: int) -> None:
        self.state_dir = state_dir
        self.token = secrets.token_hex(32)
        self.cond = threading.Condition()
        self.cells: collections.OrderedDict[str, Cell] = collections.OrderedDict()
        self.forgotten: set[str] = set()
        self.work = WorkQueue()
        self.current: Optional[Cell] = None
        # What threads, timers and comms produce while no cell runs: the kernel keeps
        # one poll waiting on it and publishes it as the stock kernel does (under the
        # request that was last active). ``epoch`` tells a replaced agent apart.
        self.background = background_log()
        self.epoch = secrets.token_hex(8)
        self.runner: Optional[Runner] = None
        self.ready = threading.Event()
        self.jedi_warm_up: Optional[threading.Thread] = None
        self.comm_manager: Any = None  # comm.base_comm.CommManager, once the runner exists
        self.io = OutputCapture(self, log_fd)
        # The working folder's files: what each cell changed goes into its done event.
        self.files = Tracker()
        self.main_ident = threading.get_ident()
        self.pid = os.getpid()
        self.port = 0
        self.last_count = 0
        # No cell or comm message has reached this agent yet (``info`` says so): a kernel
        # adopts a pooled agent only while this holds.
        self.pristine = True
        self.in_user_code = False
        # Held while a request is served or a cell runs; the jedi warm-up waits on it.
        self.gate = Gate()
        self._critical_depth = 0
        self._sigint_pending = False
        self.sigints_raised = 0  # SIGINTs that became a KeyboardInterrupt (or a cancel)
        self.mode = "starting"
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self._sigint_task: Any = None
        self.version = agent_version()
        self.ipython_version = _ipython_version_without_import()
        # The debugger (started by the first debug request) and the files it must not
        # step into: the agent's own and whatever was imported before the first cell.
        self.debugger = Debugger(self)
        self.resources = Resources()
        self.own_files: list[str] = []

    # -- identity
    def info(self) -> Dict[str, Any]:
        return {
            "ok": True,
            "pid": os.getpid(),
            "port": self.port,
            "python_version": sys.version.split()[0],
            "implementation": sys.implementation.name,
            "ipython_version": self.ipython_version,
            "agent_version": self.version,
            "mode": self.mode,
            "ready": self.ready.is_set(),
            "pristine": self.pristine,
            "usage": _usage(),
            "debugger": unavailable_reason(self.mode) is None,
        }

    # -- interrupts
    def on_sigint(self, signum: int, frame: Any) -> None:
        """SIGINT handler: KeyboardInterrupt only in user code, never in the agent's."""
        if not self.in_user_code:
            return
        if self.debugger.loaded and self.debugger.in_debugger_code(frame):
            # Raised here, the KeyboardInterrupt would end debugpy's tracing of the cell
            # for good; ``Debugger.interrupt`` resumes the cell and signals again.
            return
        self.sigints_raised += 1
        task = self._sigint_task
        if task is not None and self.loop is not None:
            self.loop.call_soon_threadsafe(task.cancel)
            return
        if self._critical_depth:
            self._sigint_pending = True
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        """Defer a SIGINT that lands in agent code until that code is done."""
        if threading.get_ident() != self.main_ident:
            yield
            return
        self._critical_depth += 1
        try:
            yield
        finally:
            self._critical_depth -= 1
            if not self._critical_depth and self._sigint_pending:
                self._sigint_pending = False
                raise KeyboardInterrupt

    # -- events
    def append_stream(self, cell: Cell, name: str, text: str) -> None:
        with self.cond:
            if cell.add_stream(name, text):
                if cell is self.background:
                    trim_background(cell)
                self.cond.notify_all()

    def _append(self, cell: Cell, event: Event) -> None:
        """Add a non-stream event (caller holds ``self.cond``)."""
        if cell.add(event):
            if cell is self.background:
                trim_background(cell)
            self.cond.notify_all()

    def emit(self, event: Event) -> None:
        """Record a non-stream event of the running cell, after the output before it."""
        with self.critical():
            self.io.drain()
            event = snapshot(event)
            with self.cond:
                cell = self.current if self.current is not None else self.background
                self._append(cell, event)

    # -- main thread
    def setup_runner(self) -> None:
        """Import IPython (slow, so after ``start`` answered) or fall back."""
        runner: Optional[Runner] = None
        if os.environ.get("MODBOX_AGENT_NO_IPYTHON") != "1":
            try:
                if not os.environ.get("MPLBACKEND"):
                    try:
                        import importlib.util

                        if importlib.util.find_spec("matplotlib_inline") is not None:
                            # Before matplotlib is imported: plots become display_data.
                            os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
                    except (ImportError, ValueError):
                        pass
                runner = make_ipython_runner(self)
                import IPython

                self.ipython_version = IPython.__version__
            except Exception:
                log.exception("IPython is not usable; running cells in fallback mode")
                if os.environ.get("MPLBACKEND", "").startswith("module://matplotlib_inline"):
                    del os.environ["MPLBACKEND"]
                runner = None
        if runner is None:
            self.ipython_version = None
            os.environ.setdefault("MPLBACKEND", "Agg")
            runner = FallbackRunner(self)
        self.runner = runner
        self.mode = runner.mode
        self.comm_manager = comms.install_comms(self)
        self.own_files = sorted(
            {
                f
                for m in list(sys.modules.values())
                if isinstance(f := getattr(m, "__file__", None), str)
            }
        )
        self.ready.set()
        log.info("runner ready: %s", self.mode)

    def start_jedi_warm_up(self) -> None:
        """Warm jedi up in the background, once (called at the first completion).

        jedi's first completion parses the builtins stubs: 1-2 s of CPU in a fresh
        sandbox with an empty cache. Only a notebook whose user presses Tab needs it,
        so it starts then (the first answers come from IPython's own matchers), not
        in every sandbox at start: forty students arriving at once would otherwise
        spend a minute of CPU on it before anyone has typed anything.
        """
        if self.jedi_warm_up is not None or not self.ipython_version:
            return
        warm = untraced(
            threading.Thread(
                target=warm_up_jedi, args=(self.gate,), name="jedi-warm-up", daemon=True
            )
        )
        self.jedi_warm_up = warm
        warm.start()

    def main_loop(self) -> None:
        """Serve the work queue on an asyncio loop that runs for the agent's life.

        As in the stock kernel, cells run while an event loop is running: a cell sees
        ``asyncio.get_event_loop().is_running()``, ``asyncio.run()`` in a cell raises,
        and tasks a cell starts (``asyncio.ensure_future``) go on running between
        cells, while the loop waits for the next piece of work.
        """
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self.loop = loop
        self.work.bind(loop)
        serving: Optional[asyncio.Task[None]] = None
        while True:
            # A SIGINT in the loop's own code leaves the serving task waiting for its
            # next item: it goes on (a second one would take items in its place).
            if serving is None or serving.done():
                serving = loop.create_task(self._serve())
            try:
                loop.run_until_complete(serving)
            except BaseException:  # only a SIGINT in the loop's own code gets here
                log.exception("the agent's work loop stopped; serving again")

    async def _serve(self) -> None:
        while True:
            item = await self.work.get()
            if isinstance(item, Cell):
                await self._run_cell(item)
            else:
                item.run()

    @contextlib.contextmanager
    def sigint_cancels(self, task: Any) -> Iterator[None]:
        """While ``task`` (an awaiting cell) runs, a SIGINT cancels it instead of raising
        in whatever the loop happens to run (ipykernel's ``_cancel_on_sigint``)."""
        self._sigint_task = task
        try:
            yield
        finally:
            self._sigint_task = None

    async def _run_cell(self, cell: Cell) -> None:
        runner = self.runner
        assert runner is not None
        with self.io.lock:
            for fd in self.io.fds:  # output from before this cell is background output
                self.io.read_available(fd)
            with self.cond:
                cell.state = "running"
            self.current = cell
        log.debug("cell %s started (count %d)", cell.id, cell.execution_count)
        t0 = time.monotonic()
        measured = self.resources.cell_started() if cell.comm is None else None
        try:
            with stdin_patched(self), self.gate.busy():
                self.in_user_code = True
                try:
                    if cell.interrupt_requested:
                        raise KeyboardInterrupt
                    if cell.comm is not None:
                        done = comms.run_comm(self.comm_manager, cell)
                    else:
                        done = await runner.run_async(cell)
                finally:
                    self.in_user_code = False
        except BaseException as exc:
            # An interrupt or error that escaped the runner's own handling.
            err = format_exception(exc)
            try:
                self.emit({"type": "error", **err})
            except BaseException:
                log.exception("could not record the error of cell %s", cell.id)
            done = {"status": "error", "user_expressions": {}, "payload": [], **err}
        if os.getpid() != self.pid:
            # A bare os.fork() in the cell: this is the child, which ran the rest of the
            # cell as a copy of the agent. It must not become a second agent waiting for
            # cells (holding process slots until the sandbox ends): it ends here, as a
            # forked child of the stock kernel's cell would at the end of its code.
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(0)
        self._sigint_pending = False
        self.io.flush_c_stdio()
        self.io.drain()
        if measured is not None:
            done["usage"] = self.resources.cell_finished(measured)
        if cell.comm is None:
            changed = self.files.after_cell()
            if changed is not None:
                done["files"] = changed
        done_event = snapshot({"type": "done", "execution_count": cell.execution_count, **done})
        with self.io.lock:
            with self.cond:
                self._append(cell, done_event)
                cell.state = "finished"
            self.current = None
        if cell.comm is None:
            self.last_count = max(self.last_count, cell.execution_count)
            runner.after_cell()
        log.debug("cell %s finished: %s in %.3f s", cell.id, done["status"], time.monotonic() - t0)

    def call_on_main(self, fn: Callable[[], Any]) -> Any:
        call = Call(fn)
        self.work.put(call)
        if not call.finished.wait(META_TIMEOUT_SECONDS):
            raise TimeoutError("the agent is busy running a cell; try again when it is done")
        if call.error is not None:
            raise call.error
        return call.result

    def exit_now(self) -> None:
        """Remove our files and leave at once (a running cell dies with us)."""
        log.info("shutting down")
        remove_state_files(self.state_dir, os.getpid())
        os._exit(0)


def _usage() -> Dict[str, Any]:
    """CPU seconds of the agent and its finished children, and the memory in use: the
    sandbox's cgroup when it can be read (all its processes), else the agent's RSS."""
    times = os.times()
    cpu = times.user + times.system + times.children_user + times.children_system
    usage: Dict[str, Any] = {"cpu_seconds": round(cpu, 3)}
    try:
        usage["cwd"] = os.getcwd()
    except OSError:  # removed by the notebook
        usage["cwd"] = None
    for path, scope in (
        ("/sys/fs/cgroup/memory.current", "sandbox"),
        ("/proc/self/statm", "agent"),
    ):
        try:
            with open(path) as f:
                fields = f.read().split()
        except OSError:
            continue
        pages = 1 if scope == "sandbox" else os.sysconf("SC_PAGE_SIZE")
        usage["memory_bytes"] = int(fields[0 if scope == "sandbox" else 1]) * pages
        usage["memory_scope"] = scope
        break
    return usage


def _ipython_version_without_import() -> Optional[str]:
    """IPython's version without importing it: ``start`` must not pay for the import.

    The ``ipython-<version>.dist-info`` folder beside the package names it (a listdir);
    ``importlib.metadata`` (~40 ms to import) is only the fallback.
    """
    if os.environ.get("MODBOX_AGENT_NO_IPYTHON") == "1":
        return None
    try:
        import importlib.util

        spec = importlib.util.find_spec("IPython")
        if spec is None or not spec.origin:
            return None
        site_dir = os.path.dirname(os.path.dirname(spec.origin))
        for name in os.listdir(site_dir):
            match = re.match(r"(?i)ipython-([^-]+?)\.(dist|egg)-info$", name)
            if match:
                return match.group(1)
        from importlib import metadata

        return metadata.version("ipython")
    except Exception:
        return None
