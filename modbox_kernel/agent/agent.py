"""The Modbox in-sandbox agent: one long-lived process that holds the user's namespace.

Who calls what, and when:

* The kernel-side session uploads this file into the sandbox and runs, via one exec,
  ``python3 -u agent.py start --state-dir <dir>``. ``start`` daemonizes (double fork,
  ``setsid``), writes ``<dir>/port`` and ``<dir>/token`` and prints one JSON line.
* Every later exec is a short bash line (see ``docs/agent-protocol.md``) that connects
  to ``127.0.0.1:<port>``, sends ``<token> <base64 JSON>`` and prints the one-line
  JSON answer. A TCP server thread answers those requests.
* Cells run one at a time on the MAIN thread (so ``SIGINT`` becomes
  ``KeyboardInterrupt`` in user code), through an IPython ``InteractiveShell`` when
  IPython is importable, otherwise through a plain fallback with the same event shapes.
* fds 1 and 2 are pipes drained by a reader thread into ``stream`` events of the
  running cell, so prints, ``!cmd``, ``os.system`` and C extensions share one ordered
  stream per fd.

This file is stdlib-only, imports nothing from ``modbox_kernel`` and must run on any
CPython >= 3.8: it is executed by whatever ``python3`` the sandbox has.
"""

# ruff: noqa: UP006, UP035, UP045
# (The pyupgrade rules above would rewrite code into 3.10-only syntax; this file runs on 3.8.)

from __future__ import annotations

import base64
import builtins
import codecs
import collections
import contextlib
import faulthandler
import getpass
import hashlib
import hmac
import importlib.util
import io
import json
import logging
import os
import queue
import re
import secrets
import select
import signal
import socket
import socketserver
import sys
import threading
import time
import traceback
import types
from typing import Any, Callable, Dict, Iterator, List, Optional

AGENT_FILE = os.path.abspath(__file__)

#: Largest response (sum of serialized events) the agent sends in one answer.
MAX_RESPONSE_BYTES = 1024 * 1024
#: A stream event stops absorbing more text at this size, so one event stays small.
MERGE_LIMIT = 256 * 1024
#: Longest accepted request line (inline requests are meant to stay under 64 KiB).
MAX_REQUEST_LINE = 64 * 1024 * 1024
#: Upper bound for a long-poll, whatever the request asks.
MAX_WAIT_SECONDS = 60.0
#: How long ``start`` waits for the daemon to report that it listens.
START_TIMEOUT_SECONDS = 20.0
#: How long a complete/inspect/history request waits for the main thread.
META_TIMEOUT_SECONDS = 10.0
#: Cells whose events are kept; older finished cells keep only their id.
KEEP_CELLS = 200

RAW_INPUT_REFUSED = "raw_input was called, but this frontend does not support input requests."
GETPASS_REFUSED = "getpass was called, but this frontend does not support input requests."

Event = Dict[str, Any]

log = logging.getLogger("modbox.agent")


def _agent_version() -> str:
    """Short hash of this file's bytes: equals ``modbox_kernel.agent.AGENT_VERSION``."""
    try:
        with open(AGENT_FILE, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:12]
    except OSError:
        return "unknown"


class StdinNotImplementedError(RuntimeError):
    """Fallback twin of IPython's class: raised by ``input()`` when stdin is not allowed."""


# --------------------------------------------------------------------------- JSON helpers


def _json_default(obj: Any) -> Any:
    """Make the odd values display data carries (bytes, numpy scalars, dates) JSON-able."""
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(obj)).decode("ascii")
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    for attr in ("isoformat", "item", "tolist"):
        method = getattr(obj, attr, None)
        if callable(method):
            try:
                return method()
            except Exception:
                pass
    return str(obj)


def _snapshot(event: Event) -> Event:
    """A JSON round trip: the event no longer shares objects with user code.

    The user may mutate a dict after ``display()``; what was displayed must not change.
    """
    try:
        result: Event = json.loads(json.dumps(event, default=_json_default))
        return result
    except (TypeError, ValueError) as exc:
        # Circular structures and the like: keep the event type, say what went wrong.
        fallback: Event = {k: v for k, v in event.items() if isinstance(v, (str, int, bool))}
        if "data" in event:
            fallback["data"] = {"text/plain": f"<output could not be serialized: {exc}>"}
            fallback["metadata"] = {}
        return fallback


def _text_mime(mime: str) -> bool:
    return mime.startswith("text/") or mime in (
        "image/svg+xml",
        "application/json",
        "application/javascript",
    )


def _encode_mimebundle(data: Dict[str, Any]) -> Dict[str, Any]:
    """Binary image data becomes base64 text, as Jupyter messages carry it."""
    out: Dict[str, Any] = {}
    for mime, value in data.items():
        if isinstance(value, (bytes, bytearray)):
            raw = bytes(value)
            if _text_mime(mime):
                value = raw.decode("utf-8", "replace")
            else:
                value = base64.b64encode(raw).decode("ascii")
        out[str(mime)] = value
    return out


def _format_exception(exc: BaseException) -> Dict[str, Any]:
    """ename/evalue/traceback for an exception the runner did not format itself."""
    tb = exc.__traceback__
    # Hide the agent's own frames: the user should see their code, not ours.
    while tb is not None and tb.tb_frame.f_code.co_filename == AGENT_FILE:
        tb = tb.tb_next
    lines = traceback.format_exception(type(exc), exc, tb)
    return {
        "ename": type(exc).__name__,
        "evalue": str(exc),
        "traceback": [chunk.rstrip("\n") for chunk in lines],
    }


def _murmur2_x86(data: bytes, seed: int) -> int:
    """ipykernel's cell-name hash (``ipykernel/compiler.py``), ported byte for byte."""
    m = 0x5BD1E995
    length = len(data)
    h = seed ^ length
    rounded_end = length & 0xFFFFFFFC
    for i in range(0, rounded_end, 4):
        k = data[i] | (data[i + 1] << 8) | (data[i + 2] << 16) | (data[i + 3] << 24)
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> 24
        k = (k * m) & 0xFFFFFFFF
        h = (h * m) & 0xFFFFFFFF
        h ^= k
    tail = length & 0x03
    k = 0
    if tail == 3:
        k = data[rounded_end + 2] << 16
    if tail in (2, 3):
        k |= data[rounded_end + 1] << 8
    if tail:
        k |= data[rounded_end]
        h ^= k
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h


def cell_file_name(code: str) -> str:
    """The file name the stock kernel gives a cell's code object.

    Warnings (``/tmp/ipykernel_<pid>/<hash>.py:2: UserWarning``), SyntaxError messages
    and traceback rendering depend on it, so using ipykernel's scheme makes them read
    exactly as they do on the local ``python3`` kernel.
    """
    import tempfile

    name = _murmur2_x86(code.encode("utf-8"), 0xC70F6907)
    folder = os.path.join(tempfile.gettempdir(), f"ipykernel_{os.getpid()}")
    return os.path.join(folder, f"{name}.py")


# --------------------------------------------------------------------------- cells


class _Gate:
    """Lets background work (the jedi warm-up) run only while the agent is quiet.

    The request handlers and the cell runner hold :meth:`busy`; the background thread
    calls :meth:`wait` at safe points, which returns once nothing has been busy for
    :data:`QUIET_SECONDS`: a notebook run cell after cell (nbclient) leaves no such gap
    and pays nothing, a person at the keyboard leaves plenty. :meth:`open` lets the
    background work through for good, for a caller that needs its result now.
    """

    QUIET_SECONDS = 0.5

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._busy = 0
        self._open = False
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

    def open(self) -> None:
        with self._cond:
            self._open = True
            self._cond.notify_all()

    def is_open(self) -> bool:
        return self._open

    def closed(self) -> bool:
        """Whether work is in progress now (cheap; a racy read is fine: it is a hint)."""
        return self._busy > 0 and not self._open

    def wait(self) -> None:
        with self._cond:
            while not self._open:
                if self._busy:
                    self._cond.wait()
                    continue
                left = self._quiet_since + self.QUIET_SECONDS - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)


def _warm_up_jedi(gate: _Gate) -> None:
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
        if gate.is_open():
            sys.settrace(None)  # someone waits for the result: no more tracing cost
            return
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


def truncation_notice(limit: int) -> str:
    """The one line that replaces a cell's stream output beyond ``output_limit``.

    The kernel's own guard uses the same words, so the user sees one notice.
    """
    return (
        f"\n[Modbox: output of this cell truncated after {limit} bytes; "
        "set ModboxKernel.output_limit / MODBOX_OUTPUT_LIMIT to change the limit]\n"
    )


class _KernelFacade:
    """``get_ipython().kernel`` for ipywidgets' Output widget, which asks it for the
    request being handled (to claim that request's output); nothing else is offered.
    """

    def __init__(self, agent: Agent) -> None:
        self._agent = agent

    def get_parent(self, channel: Optional[str] = None) -> Dict[str, Any]:
        cell = self._agent.current
        if cell is None or not cell.parent_header:
            return {}
        return {"header": dict(cell.parent_header)}


def _install_comms(agent: Agent) -> Any:
    """Make the ``comm`` package (ipywidgets' transport) send through the agent.

    Kernels are meant to replace ``comm.create_comm`` and ``comm.get_comm_manager``
    (ipykernel does the same): a comm this process opens, sends or closes becomes a
    ``comm_open`` / ``comm_msg`` / ``comm_close`` event of the running cell or comm
    request, and the returned manager receives the frontend's comm messages
    (:meth:`Agent.op_comm`). None when ``comm`` is not importable here.
    """
    try:
        import comm
        from comm.base_comm import BaseComm, CommManager
    except ImportError:
        return None

    class AgentComm(BaseComm):
        def publish_msg(
            self,
            msg_type: str,
            data: Optional[Dict[str, Any]] = None,
            metadata: Optional[Dict[str, Any]] = None,
            buffers: Optional[List[Any]] = None,
            **keys: Any,
        ) -> None:
            event = {"type": msg_type, **keys, "comm_id": self.comm_id, "data": data or {}}
            event["_metadata"] = metadata or {}
            event["_buffers"] = [base64.b64encode(bytes(b)).decode("ascii") for b in buffers or []]
            agent.emit(event)

    manager = CommManager()
    comm.create_comm = AgentComm
    comm.get_comm_manager = lambda: manager
    shell = getattr(agent.runner, "shell", None)
    if shell is not None and getattr(shell, "kernel", None) is None:
        shell.kernel = _KernelFacade(agent)
    return manager


class Cell:
    """One ``execute`` request and the numbered events it produced.

    Created by a server thread, run by the main thread, read by server threads; every
    field except the request itself is guarded by ``Agent.cond``.
    """

    def __init__(self, req: Dict[str, Any], default_count: int) -> None:
        self.id = str(req["id"])
        self.code = str(req.get("code", ""))
        self.silent = bool(req.get("silent", False))
        self.store_history = bool(req.get("store_history", not self.silent))
        self.user_expressions: Dict[str, str] = dict(req.get("user_expressions") or {})
        self.allow_stdin = bool(req.get("allow_stdin", False))
        self.parent_header: Dict[str, Any] = dict(req.get("parent_header") or {})
        # A frontend's comm message to handle instead of code (see Agent._run_comm).
        comm = req.get("comm")
        self.comm: Optional[Dict[str, Any]] = comm if isinstance(comm, dict) else None
        count = req.get("execution_count")
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
        self.output_limit = max(0, int(req.get("output_limit") or 0))
        self.streamed = 0
        self.truncated = False

    @property
    def next_seq(self) -> int:
        return self.base + len(self.events)


class _Call:
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


# --------------------------------------------------------------------------- output capture


class _FdWriter(io.RawIOBase):
    """Raw writer for fd 1/2 that never loses bytes to a short write."""

    def __init__(self, fd: int, name: str) -> None:
        super().__init__()
        self._fd = fd
        self.name = name

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def write(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        total = 0
        while total < len(view):
            total += os.write(self._fd, view[total:])
        return total


class OutputCapture:
    """Owns the pipes behind fds 1 and 2 and turns their bytes into ``stream`` events.

    ``install`` is called once by the daemon's main thread before any other thread
    starts. A reader thread drains the pipes; the main thread calls ``drain`` before it
    records a non-stream event or finishes a cell, so order is kept.
    """

    def __init__(self, agent: Agent, log_fd: int) -> None:
        self.agent = agent
        self.log_fd = log_fd
        self.lock = threading.Lock()
        self.fds: Dict[int, str] = {}
        self.decoders: Dict[int, codecs.IncrementalDecoder] = {}
        self._libc_fflush: Optional[Callable[[Any], Any]] = None

    def install(self) -> None:
        for target, name in ((1, "stdout"), (2, "stderr")):
            r, w = os.pipe()
            os.dup2(w, target)
            os.close(w)
            os.set_blocking(r, False)
            self.fds[r] = name
            self.decoders[r] = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # Write-through text wrappers: a print reaches the pipe before the next
        # os.write(1, ...) of a C extension or subprocess, so one pipe keeps the order.
        sys.stdout = self._text_stream(1, "<stdout>")
        sys.stderr = self._text_stream(2, "<stderr>")
        thread = threading.Thread(target=self._reader, name="modbox-output", daemon=True)
        thread.start()

    @staticmethod
    def _text_stream(fd: int, name: str) -> io.TextIOWrapper:
        return io.TextIOWrapper(
            _FdWriter(fd, name),
            encoding="utf-8",
            errors="backslashreplace",
            write_through=True,
        )

    def _reader(self) -> None:
        fds = list(self.fds)
        while True:
            try:
                ready, _, _ = select.select(fds, [], [])
                with self.lock:
                    for fd in ready:
                        self._read_available(fd)
            except Exception:
                log.exception("output reader failed; retrying")
                time.sleep(0.1)

    def _read_available(self, fd: int) -> None:
        """Read what the pipe holds right now (caller holds ``self.lock``)."""
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return
            if not data:
                return
            text = self.decoders[fd].decode(data)
            if text:
                self._deliver(self.fds[fd], text)

    def _deliver(self, name: str, text: str) -> None:
        cell = self.agent.current
        if cell is not None:
            self.agent.append_stream(cell, name, text)
        else:
            # Output between cells (background threads, startup) is not a cell's.
            try:
                os.write(self.log_fd, f"[{name} between cells] {text}".encode())
            except OSError:
                pass

    def flush_c_stdio(self) -> None:
        """Flush C stdio buffers (printf in extensions) so their text joins this cell."""
        if self._libc_fflush is None:
            try:
                import ctypes

                self._libc_fflush = ctypes.CDLL(None).fflush
            except Exception:
                self._libc_fflush = lambda _ptr: None
        try:
            self._libc_fflush(None)
        except Exception:
            pass

    def drain(self) -> None:
        """Make everything written so far into events (main thread, synchronous)."""
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                if stream is not None:
                    stream.flush()
            except Exception:
                pass
        with self.lock:
            for fd in self.fds:
                self._read_available(fd)


# --------------------------------------------------------------------------- runners


class Runner:
    """How cells run: ``IPythonRunner`` or ``FallbackRunner``. Main thread only."""

    mode = "none"
    stdin_error: type = StdinNotImplementedError

    def run(self, cell: Cell) -> Dict[str, Any]:
        """Run the cell; return the ``done`` fields (status, user_expressions, payload…)."""
        raise NotImplementedError

    def complete(self, code: str, cursor_pos: int) -> Dict[str, Any]:
        raise NotImplementedError

    def inspect(self, code: str, cursor_pos: int, detail_level: int) -> Dict[str, Any]:
        raise NotImplementedError

    def is_complete(self, code: str) -> Dict[str, Any]:
        raise NotImplementedError

    def history(self, req: Dict[str, Any]) -> List[Any]:
        raise NotImplementedError


def _make_ipython_runner(agent: Agent) -> Runner:
    """Build the InteractiveShell subclass (IPython is imported here, lazily)."""
    from IPython.core import page, payloadpage
    from IPython.core.compilerop import CachingCompiler
    from IPython.core.displayhook import DisplayHook
    from IPython.core.displaypub import DisplayPublisher
    from IPython.core.error import StdinNotImplementedError as IPyStdinError
    from IPython.core.error import UsageError
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.tokenutil import line_at_cursor, token_at_cursor
    from traitlets import CBool, Type

    class AgentCompiler(CachingCompiler):
        """Names cells like ipykernel's XCachingCompiler (see ``cell_file_name``)."""

        def get_code_name(self, raw_code: str, transformed_code: str, number: int) -> str:
            return cell_file_name(raw_code)

    class AgentDisplayPublisher(DisplayPublisher):
        """display()/update_display()/clear_output() become events (like ipykernel's)."""

        def publish(
            self,
            data: Dict[str, Any],
            metadata: Optional[Dict[str, Any]] = None,
            source: Any = None,
            *,
            transient: Optional[Dict[str, Any]] = None,
            update: bool = False,
            **kwargs: Any,
        ) -> None:
            agent.emit(
                {
                    "type": "update_display_data" if update else "display_data",
                    "data": _encode_mimebundle(data),
                    "metadata": dict(metadata or {}),
                    "transient": dict(transient or {}),
                }
            )

        def clear_output(self, wait: bool = False) -> None:
            agent.emit({"type": "clear_output", "wait": bool(wait)})

    class AgentDisplayHook(DisplayHook):
        """The value of a cell's last expression becomes an ``execute_result``."""

        msg: Optional[Dict[str, Any]] = None

        def start_displayhook(self) -> None:
            self.msg = {"data": {}, "metadata": {}}

        def write_output_prompt(self) -> None:
            if self.msg is not None:
                self.msg["execution_count"] = self.prompt_count

        def write_format_data(
            self, format_dict: Dict[str, Any], md_dict: Optional[Dict[str, Any]] = None
        ) -> None:
            if self.msg is not None:
                self.msg["data"] = _encode_mimebundle(format_dict)
                self.msg["metadata"] = dict(md_dict or {})

        def finish_displayhook(self) -> None:
            msg, self.msg = self.msg, None
            if msg and msg["data"]:
                msg.setdefault("execution_count", self.prompt_count)
                agent.emit({"type": "execute_result", **msg})

    class AgentShell(InteractiveShell):
        """InteractiveShell that reports through the agent, modelled on ZMQInteractiveShell."""

        compiler_class = Type(AgentCompiler)
        displayhook_class = Type(AgentDisplayHook)
        display_pub_class = Type(AgentDisplayPublisher)
        readline_use = CBool(False)
        autoindent = CBool(False)
        _last_traceback: Optional[List[str]] = None
        _last_traceback_during_displayhook = False

        def init_environment(self) -> None:
            # Same as ipykernel: no terminal pagers, colour where tools support it.
            env = os.environ
            env["TERM"] = "xterm-color"
            env["CLICOLOR"] = "1"
            env["FORCE_COLOR"] = "1"
            env["CLICOLOR_FORCE"] = "1"
            env["PAGER"] = "cat"
            env["GIT_PAGER"] = "cat"

        def init_hooks(self) -> None:
            super().init_hooks()
            # `obj?` goes to the pager, which for a kernel is the execute reply's payload.
            self.set_hook("show_in_pager", page.as_hook(payloadpage.page), 99)

        def enable_gui(self, gui: Any = None) -> None:
            if gui:
                raise UsageError(
                    f"GUI event loops ({gui}) cannot run inside the sandbox; "
                    "use the inline backend (%matplotlib inline)."
                )

        def ask_exit(self) -> None:
            # exit()/quit(): the kernel decides what that means (as ipykernel does).
            assert self.payload_manager is not None
            self.payload_manager.write_payload({"source": "ask_exit", "keepkernel": False})

        def set_next_input(self, text: str, replace: bool = False) -> None:
            assert self.payload_manager is not None
            self.payload_manager.write_payload(
                {"source": "set_next_input", "text": text, "replace": replace}
            )

        def run_cell(self, *args: Any, **kwargs: Any) -> Any:
            self._last_traceback = None
            self._last_traceback_during_displayhook = False
            return super().run_cell(*args, **kwargs)

        def _get_exc_info(self, exc_tuple: Any = None) -> Any:
            etype, value, tb = super()._get_exc_info(exc_tuple)
            # A KeyboardInterrupt raised by the agent's SIGINT handler ends in a frame of
            # this file (ipykernel's C-level handler leaves none). Users must not see it,
            # and rendering it makes IPython parse this whole file: ~0.5 s once.
            return etype, value, _without_agent_tail(tb)

        def _showtraceback(self, etype: Any, evalue: Any, stb: List[str]) -> None:
            # Exactly one `error` event and nothing on stderr (jupyter_kernel_test checks).
            if getattr(self.displayhook, "msg", None) is not None:
                self._last_traceback_during_displayhook = True
            agent.emit(
                {
                    "type": "error",
                    "ename": str(etype.__name__),
                    "evalue": str(evalue),
                    "traceback": list(stb),
                }
            )
            self._last_traceback = list(stb)

    class IPythonRunner(Runner):
        mode = "ipython"
        stdin_error = IPyStdinError

        def __init__(self) -> None:
            # Any: IPython's attributes are Optional in its hints but always set here.
            self.shell: Any = AgentShell.instance()
            self._init_like_kernelapp()
            self._warm_up_tracebacks()

        def _warm_up_tracebacks(self) -> None:
            """Format one traceback now, before the first cell.

            The first traceback of a process imports and primes IPython's formatter
            (stack_data, pygments); done lazily, that cost (up to seconds on a loaded
            host) would land on the user's first interrupt or error.
            """
            source = "def _modbox_warm_up():\n    raise KeyboardInterrupt\n_modbox_warm_up()\n"
            try:
                filename = self.shell.compile.cache(source, 0)
                exec(compile(source, filename, "exec"), {})
            except KeyboardInterrupt:
                etype, evalue, tb = sys.exc_info()
                try:
                    self.shell.InteractiveTB.structured_traceback(etype, evalue, tb)
                except Exception:  # only an optimisation
                    log.debug("traceback warm-up failed", exc_info=True)
            except Exception:
                log.debug("traceback warm-up failed", exc_info=True)

        def _init_like_kernelapp(self) -> None:
            """What IPKernelApp adds around its shell: default extension, startup files."""
            shell = self.shell
            try:
                shell.extension_manager.load_extension("storemagic")  # %store
            except Exception:
                log.exception("could not load the storemagic extension")
            # Profile startup files run before the first cell, in name order, like
            # InteractiveShellApp._run_startup_files (their output goes to the log).
            startup_dir = shell.profile_dir.startup_dir
            try:
                names = sorted(os.listdir(startup_dir))
            except OSError:
                names = []
            for name in names:
                path = os.path.join(startup_dir, name)
                if name.endswith(".py"):
                    shell.safe_execfile(path, shell.user_ns)
                elif name.endswith(".ipy"):
                    shell.safe_execfile_ipy(path)

        def run(self, cell: Cell) -> Dict[str, Any]:
            shell = self.shell
            # The kernel owns the count: tracebacks and Out[n] must show its number.
            shell.execution_count = cell.execution_count
            if cell.store_history and not cell.silent:
                self._align_input_history(cell.execution_count)
            res = shell.run_cell(cell.code, store_history=cell.store_history, silent=cell.silent)
            reply: Dict[str, Any] = {}
            during_dh = getattr(shell, "_last_traceback_during_displayhook", False)
            if res.success and not during_dh:
                reply["status"] = "ok"
                reply["user_expressions"] = shell.user_expressions(cell.user_expressions)
            else:
                err = res.error_before_exec if res.error_before_exec is not None else None
                if err is None:
                    err = res.error_in_exec
                reply["status"] = "error"
                reply["ename"] = type(err).__name__ if err is not None else "Error"
                reply["evalue"] = str(err) if err is not None else ""
                reply["traceback"] = shell._last_traceback or []
                reply["user_expressions"] = {}
            reply["payload"] = shell.payload_manager.read_payload()
            shell.payload_manager.clear_payload()
            return reply

        def _align_input_history(self, count: int) -> None:
            """Keep ``In[n]`` (and history ranges) indexed by the kernel's count.

            IPython appends each input to lists indexed by position; when the kernel's
            count skips ahead (a restarted agent, a silent cell) pad them so position
            ``n`` still holds cell ``n``.
            """
            hm = self.shell.history_manager
            for hist in (hm.input_hist_parsed, hm.input_hist_raw):
                while len(hist) < count:
                    hist.append("")

        def complete(self, code: str, cursor_pos: int) -> Dict[str, Any]:
            # ipykernel's default path (its "experimental" completions API): the legacy
            # shell.complete() finds nothing while jedi is on in recent IPython.
            try:
                from IPython.core.completer import provisionalcompleter, rectify_completions
            except ImportError:
                return self._complete_legacy(code, cursor_pos)
            with provisionalcompleter():
                raw = self.shell.Completer.completions(code, cursor_pos)
                completions = list(rectify_completions(code, raw))
                types_ = [
                    {
                        "start": c.start,
                        "end": c.end,
                        "text": c.text,
                        "type": c.type,
                        "signature": c.signature,
                    }
                    for c in completions
                ]
            if completions:
                start, end = completions[0].start, completions[0].end
            else:
                start = end = cursor_pos
            return {
                "matches": [c.text for c in completions],
                "cursor_start": start,
                "cursor_end": end,
                "metadata": {"_jupyter_types_experimental": types_},
            }

        def _complete_legacy(self, code: str, cursor_pos: int) -> Dict[str, Any]:
            line, offset = line_at_cursor(code, cursor_pos)
            txt, matches = self.shell.complete("", line, cursor_pos - offset)
            return {
                "matches": list(matches),
                "cursor_start": cursor_pos - len(txt),
                "cursor_end": cursor_pos,
                "metadata": {},
            }

        def inspect(self, code: str, cursor_pos: int, detail_level: int) -> Dict[str, Any]:
            name = token_at_cursor(code, cursor_pos)
            reply: Dict[str, Any] = {"data": {}, "metadata": {}, "found": False}
            try:
                bundle = self.shell.object_inspect_mime(name, detail_level=detail_level)
            except KeyError:
                return reply
            reply["data"] = dict(bundle)
            if not self.shell.enable_html_pager:
                reply["data"].pop("text/html", None)
            reply["found"] = True
            return reply

        def is_complete(self, code: str) -> Dict[str, Any]:
            status, indent = self.shell.input_transformer_manager.check_complete(code)
            reply: Dict[str, Any] = {"status": status}
            if status == "incomplete":
                reply["indent"] = " " * (indent or 0)
            return reply

        def history(self, req: Dict[str, Any]) -> List[Any]:
            hm = self.shell.history_manager
            kind = req.get("hist_access_type")
            raw = bool(req.get("raw", True))
            output = bool(req.get("output", False))
            if kind == "tail":
                n = req.get("n")
                hist = hm.get_tail(
                    10 if n is None else int(n), raw=raw, output=output, include_latest=True
                )
            elif kind == "range":
                hist = hm.get_range(
                    int(req.get("session") or 0),
                    int(req.get("start") or 0),
                    req.get("stop"),
                    raw=raw,
                    output=output,
                )
            elif kind == "search":
                hist = hm.search(
                    req.get("pattern") or "*",
                    raw=raw,
                    output=output,
                    n=req.get("n"),
                    unique=bool(req.get("unique", False)),
                )
            else:
                hist = []
            return [list(entry) for entry in hist]

    return IPythonRunner()


class FallbackRunner(Runner):
    """Plain-Python cells when IPython is missing: exec all, display the last expression."""

    mode = "fallback"
    stdin_error = StdinNotImplementedError
    session = 1

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        module = types.ModuleType("__main__")
        module.__dict__["__builtins__"] = builtins
        module.__dict__["display"] = self._display
        sys.modules["__main__"] = module
        self.ns = module.__dict__
        self.records: List[List[Any]] = []  # [session, line, source]
        self.loop: Any = None

    # -- running
    def run(self, cell: Cell) -> Dict[str, Any]:
        import linecache

        n = cell.execution_count
        filename = f"Cell In[{n}]"
        # Register the source so tracebacks show the offending lines.
        linecache.cache[filename] = (len(cell.code), None, cell.code.splitlines(True), filename)
        if cell.store_history and not cell.silent:
            self.records.append([self.session, n, cell.code])
        try:
            self._exec(cell, filename)
            self._flush_figures()
        except BaseException as exc:
            err = _format_exception(exc)
            self.agent.emit({"type": "error", **err})
            return {"status": "error", "user_expressions": {}, "payload": [], **err}
        return {
            "status": "ok",
            "user_expressions": self._user_expressions(cell.user_expressions),
            "payload": [],
        }

    def _exec(self, cell: Cell, filename: str) -> None:
        import ast

        flags = getattr(ast, "PyCF_ALLOW_TOP_LEVEL_AWAIT", 0)
        tree = ast.parse(cell.code, filename, "exec")
        last: Any = None
        if tree.body and isinstance(tree.body[-1], ast.Expr) and not cell.silent:
            last = tree.body.pop().value  # type: ignore[attr-defined]
        body = compile(tree, filename, "exec", flags=flags, dont_inherit=True)
        self._eval(body)
        if last is not None:
            expr = compile(ast.Expression(last), filename, "eval", flags=flags, dont_inherit=True)
            value = self._eval(expr)
            if value is not None:
                self.ns["_"] = value
                self.agent.emit(
                    {
                        "type": "execute_result",
                        "execution_count": cell.execution_count,
                        **self._format(value),
                    }
                )

    def _eval(self, code: types.CodeType) -> Any:
        result = eval(code, self.ns)
        if code.co_flags & 0x80:  # CO_COROUTINE: the cell used top-level await
            import asyncio

            if self.loop is None:
                self.loop = asyncio.new_event_loop()
            result = self.loop.run_until_complete(result)
        return result

    _REPR_METHODS = (
        ("_repr_html_", "text/html"),
        ("_repr_markdown_", "text/markdown"),
        ("_repr_svg_", "image/svg+xml"),
        ("_repr_png_", "image/png"),
        ("_repr_jpeg_", "image/jpeg"),
        ("_repr_latex_", "text/latex"),
        ("_repr_json_", "application/json"),
        ("_repr_javascript_", "application/javascript"),
    )

    def _format(self, obj: Any) -> Dict[str, Any]:
        """A mimebundle like IPython's formatters would give, from repr and _repr_*_."""
        data: Dict[str, Any] = {"text/plain": repr(obj)}
        metadata: Dict[str, Any] = {}
        if not isinstance(obj, type):
            for method_name, mime in self._REPR_METHODS:
                method = getattr(obj, method_name, None)
                if not callable(method):
                    continue
                try:
                    value = method()
                except Exception:
                    continue
                if isinstance(value, tuple) and len(value) == 2:
                    value, md = value
                    metadata[mime] = md
                if value is not None:
                    data[mime] = value
            bundle = getattr(obj, "_repr_mimebundle_", None)
            if callable(bundle):
                try:
                    extra = bundle()
                    if isinstance(extra, tuple):
                        extra, md = extra
                        metadata.update(md or {})
                    data.update(extra or {})
                except Exception:
                    pass
        return {"data": _encode_mimebundle(data), "metadata": metadata}

    def _display(self, *objs: Any, **kwargs: Any) -> None:
        for obj in objs:
            self.agent.emit({"type": "display_data", "transient": {}, **self._format(obj)})

    def _flush_figures(self) -> None:
        """Open matplotlib figures become PNG display_data at cell end, like inline."""
        plt = sys.modules.get("matplotlib.pyplot")
        if plt is None:
            return
        for num in plt.get_fignums():
            fig = plt.figure(num)
            buf = io.BytesIO()
            fig.savefig(buf, format="png", bbox_inches="tight")
            self.agent.emit(
                {
                    "type": "display_data",
                    "data": {
                        "text/plain": repr(fig),
                        "image/png": base64.b64encode(buf.getvalue()).decode("ascii"),
                    },
                    "metadata": {},
                    "transient": {},
                }
            )
        plt.close("all")

    def _user_expressions(self, expressions: Dict[str, str]) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for key, expr in expressions.items():
            try:
                value = eval(expr, self.ns)
                out[key] = {"status": "ok", **self._format(value)}
            except Exception as exc:
                out[key] = {"status": "error", **_format_exception(exc)}
        return out

    # -- introspection
    @staticmethod
    def _token(code: str, cursor_pos: int) -> str:
        before = re.search(r"[\w.]*$", code[:cursor_pos])
        after = re.match(r"\w*", code[cursor_pos:])
        return (before.group(0) if before else "") + (after.group(0) if after else "")

    def complete(self, code: str, cursor_pos: int) -> Dict[str, Any]:
        match = re.search(r"[\w.]*$", code[:cursor_pos])
        text = match.group(0) if match else ""
        import rlcompleter

        completer = rlcompleter.Completer(self.ns)
        matches: List[str] = []
        for state in range(1000):
            item = completer.complete(text, state)
            if item is None:
                break
            item = item.rstrip("(")  # rlcompleter marks callables; Jupyter does not
            if item not in matches:
                matches.append(item)
        return {
            "matches": matches,
            "cursor_start": cursor_pos - len(text),
            "cursor_end": cursor_pos,
            "metadata": {},
        }

    def inspect(self, code: str, cursor_pos: int, detail_level: int) -> Dict[str, Any]:
        name = self._token(code, cursor_pos).strip(".")
        reply: Dict[str, Any] = {"found": False, "data": {}, "metadata": {}}
        if not name:
            return reply
        head, *rest = name.split(".")
        if head in self.ns:
            obj = self.ns[head]
        elif hasattr(builtins, head):
            obj = getattr(builtins, head)
        else:
            return reply
        try:
            for part in rest:
                obj = getattr(obj, part)
        except Exception:
            return reply
        import pydoc

        text = pydoc.render_doc(obj, title=name + ": %s", renderer=pydoc.plaintext)  # type: ignore[attr-defined]
        reply["data"] = {"text/plain": text}
        reply["found"] = True
        return reply

    def is_complete(self, code: str) -> Dict[str, Any]:
        import codeop

        try:
            compiled = codeop.compile_command(code, "<cell>", "exec")
        except (SyntaxError, OverflowError, ValueError):
            return {"status": "invalid"}
        if compiled is None:
            last = code.rstrip("\n").split("\n")[-1]
            indent = len(last) - len(last.lstrip(" "))
            if last.rstrip().endswith(":"):
                indent += 4
            return {"status": "incomplete", "indent": " " * indent}
        return {"status": "complete"}

    def history(self, req: Dict[str, Any]) -> List[Any]:
        kind = req.get("hist_access_type")
        output = bool(req.get("output", False))
        records = self.records
        if kind == "tail":
            n = int(req.get("n") or 10)
            records = records[-n:] if n > 0 else []
        elif kind == "range":
            session = int(req.get("session") or 0)
            if session <= 0:
                session += self.session
            start = int(req.get("start") or 0)
            stop = req.get("stop")
            records = [
                r
                for r in records
                if r[0] == session and r[1] >= start and (stop is None or r[1] < int(stop))
            ]
        elif kind == "search":
            import fnmatch

            pattern = str(req.get("pattern") or "*")
            records = [r for r in records if fnmatch.fnmatchcase(r[2], pattern)]
            if req.get("unique"):
                latest: Dict[str, List[Any]] = {}
                for r in records:
                    latest.pop(r[2], None)
                    latest[r[2]] = r
                records = list(latest.values())
            limit = req.get("n")
            if limit is not None:
                records = records[-int(limit) :] if int(limit) > 0 else []
        else:
            records = []
        if output:
            return [[r[0], r[1], [r[2], None]] for r in records]
        return [list(r) for r in records]


# --------------------------------------------------------------------------- the agent


class Agent:
    """The daemon's state: cells and their events, the work queue, the runner.

    The main thread calls ``main_loop`` (runs cells and meta calls in order); server
    threads call ``handle_request``; the output reader calls ``append_stream``.
    """

    def __init__(self, state_dir: str, log_fd: int) -> None:
        self.state_dir = state_dir
        self.token = secrets.token_hex(32)
        self.cond = threading.Condition()
        self.cells: collections.OrderedDict[str, Cell] = collections.OrderedDict()
        self.forgotten: set[str] = set()
        self.work: queue.Queue[Any] = queue.Queue()
        self.current: Optional[Cell] = None
        self.runner: Optional[Runner] = None
        self.ready = threading.Event()
        self.jedi_warm_up: Optional[threading.Thread] = None
        self.comm_manager: Any = None  # comm.base_comm.CommManager, once the runner exists
        self.io = OutputCapture(self, log_fd)
        self.main_ident = threading.get_ident()
        self.pid = os.getpid()
        self.port = 0
        self.last_count = 0
        self._in_user_code = False
        # Held while a request is served or a cell runs; the jedi warm-up waits on it.
        self.gate = _Gate()
        self._critical_depth = 0
        self._sigint_pending = False
        self.mode = "starting"
        self.version = _agent_version()
        self.ipython_version = _ipython_version_without_import()

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
        }

    # -- interrupts
    def on_sigint(self, signum: int, frame: Any) -> None:
        """SIGINT handler: KeyboardInterrupt only in user code, never in the agent's."""
        if not self._in_user_code:
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
            if cell.state == "finished" or cell.truncated:
                return
            if cell.output_limit:
                room = cell.output_limit - cell.streamed
                if len(text) > room:
                    text = text[: max(0, room)] + truncation_notice(cell.output_limit)
                    cell.truncated = True
                cell.streamed += len(text)
            last = cell.events[-1] if cell.events else None
            if (
                last is not None
                and last["type"] == "stream"
                and last["name"] == name
                and last["seq"] >= cell.fetched
                and last["_len"] < MERGE_LIMIT
            ):
                # Not yet returned to the kernel: merge (a flood of prints → few events).
                last["_parts"].append(text)
                last["_len"] += len(text)
            else:
                event = {"seq": cell.next_seq, "type": "stream", "name": name}
                event.update({"text": "", "_parts": [text], "_len": len(text)})
                cell.events.append(event)
            self.cond.notify_all()

    def _append(self, cell: Cell, event: Event) -> None:
        """Add a non-stream event (caller holds ``self.cond``)."""
        if cell.state == "finished":
            return
        event["seq"] = cell.next_seq
        cell.events.append(event)
        if event["type"] == "done":
            cell.done_seq = event["seq"]
        self.cond.notify_all()

    def emit(self, event: Event) -> None:
        """Record a non-stream event of the running cell, after the output before it."""
        with self.critical():
            self.io.drain()
            event = _snapshot(event)
            with self.cond:
                cell = self.current
                if cell is None:
                    log.info("dropped a %s event produced outside a cell", event.get("type"))
                    return
                self._append(cell, event)

    # -- stdin
    def read_input(self, prompt: Any, password: bool) -> str:
        """input()/getpass() of user code: ask the kernel, wait for ``input_reply``."""
        cell = self.current
        assert cell is not None
        with self.cond:
            cell.input_value = None
            cell.waiting_input = True
        self.emit({"type": "input_request", "prompt": str(prompt), "password": password})
        try:
            with self.cond:
                while cell.input_value is None:
                    self.cond.wait(0.2)
                value = cell.input_value
        except KeyboardInterrupt:
            raise KeyboardInterrupt("Interrupted by user") from None
        finally:
            with self.cond:
                cell.waiting_input = False
                cell.input_value = None
        if value == "\x04":  # what ipykernel treats as EOF (Ctrl-D)
            raise EOFError
        return value

    @contextlib.contextmanager
    def _stdin_patched(self) -> Iterator[None]:
        saved_input, saved_getpass = builtins.input, getpass.getpass
        cell = self.current
        allowed = cell is not None and cell.allow_stdin
        refused = self.runner.stdin_error if self.runner else StdinNotImplementedError

        # Named and shaped like ipykernel's replacements: when stdin is refused the
        # traceback's last frame is this small function, as it is ipykernel's there.
        def raw_input(prompt: Any = "") -> str:
            __tracebackhide__ = True  # shown only when it is the raising frame
            if not allowed:
                raise refused(RAW_INPUT_REFUSED)
            return self.read_input(prompt, False)

        def getpass_(prompt: Any = "", stream: Any = None, **kwargs: Any) -> str:
            __tracebackhide__ = True
            if not allowed:
                raise refused(GETPASS_REFUSED)
            return self.read_input(prompt, True)

        builtins.input = raw_input
        getpass.getpass = getpass_
        try:
            yield
        finally:
            builtins.input, getpass.getpass = saved_input, saved_getpass

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
                runner = _make_ipython_runner(self)
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
        self.comm_manager = _install_comms(self)
        self.ready.set()
        log.info("runner ready: %s", self.mode)
        if self.ipython_version:
            # jedi's first completion parses the builtins stubs (seconds on a fresh
            # sandbox with an empty cache); do it now, off the main thread, so the
            # user's first Tab is fast. parso's parse cache is process-wide.
            warm = threading.Thread(
                target=_warm_up_jedi, args=(self.gate,), name="jedi-warm-up", daemon=True
            )
            self.jedi_warm_up = warm
            warm.start()

    def main_loop(self) -> None:
        while True:
            item = self.work.get()
            if isinstance(item, Cell):
                self._run_cell(item)
            else:
                item.run()

    def _run_cell(self, cell: Cell) -> None:
        runner = self.runner
        assert runner is not None
        with self.io.lock:
            for fd in self.io.fds:  # output from before this cell goes to the log
                self.io._read_available(fd)
            with self.cond:
                cell.state = "running"
            self.current = cell
        log.info("cell %s started (count %d)", cell.id, cell.execution_count)
        t0 = time.monotonic()
        try:
            with self._stdin_patched(), self.gate.busy():
                self._in_user_code = True
                try:
                    if cell.interrupt_requested:
                        raise KeyboardInterrupt
                    done = self._run_comm(cell) if cell.comm is not None else runner.run(cell)
                finally:
                    self._in_user_code = False
        except BaseException as exc:
            # An interrupt or error that escaped the runner's own handling.
            err = _format_exception(exc)
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
        done_event = _snapshot({"type": "done", "execution_count": cell.execution_count, **done})
        with self.io.lock:
            with self.cond:
                self._append(cell, done_event)
                cell.state = "finished"
            self.current = None
        if cell.comm is None:
            self.last_count = max(self.last_count, cell.execution_count)
        log.info("cell %s finished: %s in %.3f s", cell.id, done["status"], time.monotonic() - t0)

    def call_on_main(self, fn: Callable[[], Any]) -> Any:
        call = _Call(fn)
        self.work.put(call)
        if not call.finished.wait(META_TIMEOUT_SECONDS):
            raise TimeoutError("the agent is busy running a cell; try again when it is done")
        if call.error is not None:
            raise call.error
        return call.result

    # -- requests
    def handle_line(self, line: bytes) -> Dict[str, Any]:
        text = line.decode("ascii", "replace").strip()
        token, _, body = text.partition(" ")
        if not hmac.compare_digest(token.encode(), self.token.encode()):
            return {"ok": False, "error": "bad token"}
        req = _decode_request(body.strip())
        if not isinstance(req, dict):
            return {"ok": False, "error": "the request is not a JSON object"}
        return self.handle_request(req)

    def handle_request(self, req: Dict[str, Any]) -> Dict[str, Any]:
        op = req.get("op")
        handler = getattr(self, f"op_{op}", None) if isinstance(op, str) else None
        if handler is None:
            return {"ok": False, "error": f"unknown op {op!r}"}
        result: Dict[str, Any] = handler(req)
        return result

    def op_execute(self, req: Dict[str, Any]) -> Dict[str, Any]:
        if "id" not in req:
            return {"ok": False, "error": "execute needs an id"}
        cid = str(req["id"])
        with self.cond:
            cell = self.cells.get(cid)
            known = cell is not None or cid in self.forgotten
            if not known:
                cell = Cell(req, self.last_count + 1)
                self.cells[cid] = cell
                self._forget_old_cells()
                self.work.put(cell)
        if cell is None:
            return {"ok": False, "error": f"cell {cid} finished long ago; its events are gone"}
        if known:  # a resent execute never runs the code again: it is a poll
            return self._collect(cell, req, until_done=False)
        return self._collect(cell, req, until_done=True)

    def op_poll(self, req: Dict[str, Any]) -> Dict[str, Any]:
        with self.cond:
            cell = self.cells.get(str(req.get("id")))
        if cell is None:
            return {"ok": False, "error": f"unknown cell id {req.get('id')!r}"}
        return self._collect(cell, req, until_done=False)

    def _forget_old_cells(self) -> None:
        while len(self.cells) > KEEP_CELLS:
            oldest_id, oldest = next(iter(self.cells.items()))
            if oldest.state != "finished":
                return
            del self.cells[oldest_id]
            self.forgotten.add(oldest_id)

    def _collect(self, cell: Cell, req: Dict[str, Any], until_done: bool) -> Dict[str, Any]:
        since = max(0, int(req.get("since") or 0))
        wait = min(max(0.0, float(req.get("wait") or 0)), MAX_WAIT_SECONDS)
        deadline = time.monotonic() + wait
        with self.cond:
            while True:
                if until_done:
                    ready = cell.state == "finished"
                else:
                    ready = cell.next_seq > since or cell.state == "finished"
                remaining = deadline - time.monotonic()
                if ready or remaining <= 0:
                    break
                self.cond.wait(remaining)
            # The kernel holds everything before `since`: free it.
            drop = min(since, cell.fetched) - cell.base
            if drop > 0:
                del cell.events[:drop]
                cell.base += drop
            start = min(max(since, cell.base), cell.next_seq)
            out: List[Event] = []
            size = 0
            for event in cell.events[start - cell.base :]:
                if "_parts" in event:
                    event["text"] = "".join(event.pop("_parts"))
                    del event["_len"]
                n = len(json.dumps(event))
                if out and size + n > MAX_RESPONSE_BYTES:
                    break
                out.append(event)
                size += n
            nxt = start + len(out)
            cell.fetched = max(cell.fetched, nxt)
            done = 0 <= cell.done_seq < nxt
        return {"ok": True, "events": out, "next": nxt, "done": done}

    def op_interrupt(self, req: Dict[str, Any]) -> Dict[str, Any]:
        with self.cond:
            cell = self.cells.get(str(req.get("id")))
            if cell is None or cell.state == "finished":
                return {"ok": True, "delivered": False}
            cell.interrupt_requested = True
            running = cell.state == "running" and self._in_user_code and self.current is cell
        if running:
            # pthread_kill, not kill: the main thread must be the one whose sleep/read
            # gets EINTR, or the KeyboardInterrupt waits for that call to return.
            signal.pthread_kill(self.main_ident, signal.SIGINT)
            _interrupt_children()
        # A queued cell sees interrupt_requested when it starts and does not run.
        return {"ok": True, "delivered": True}

    def op_input_reply(self, req: Dict[str, Any]) -> Dict[str, Any]:
        with self.cond:
            cell = self.cells.get(str(req.get("id")))
            if cell is None or not cell.waiting_input or cell.input_value is not None:
                return {"ok": False, "error": f"cell {req.get('id')!r} is not waiting for input"}
            cell.input_value = str(req.get("value", ""))
            self.cond.notify_all()
        return {"ok": True}

    def _meta(self, fn: Callable[[Runner], Dict[str, Any]]) -> Dict[str, Any]:
        def call() -> Dict[str, Any]:
            assert self.runner is not None
            return fn(self.runner)

        try:
            reply = self.call_on_main(call)
        except TimeoutError as exc:
            return {"ok": False, "error": str(exc)}
        return {"ok": True, "reply": _snapshot(reply)}

    def _run_comm(self, cell: Cell) -> Dict[str, Any]:
        """Handle a frontend's ``comm_open`` / ``comm_msg`` / ``comm_close`` (main thread).

        It arrives as an ``execute`` carrying ``comm`` instead of code, so it queues
        behind the running cell (as ipykernel handles it between execute requests),
        and what its handlers publish or print (a widget's echo, an ``observe``
        callback's output, a button's long job) streams back like a cell's events.
        (The kernel sends no interrupts for it: its interrupt stops cells only.)
        """
        request = cell.comm or {}
        kind = str(request.get("msg_type"))
        manager = self.comm_manager
        if manager is not None and kind in ("comm_open", "comm_msg", "comm_close"):
            msg = {
                "header": {"msg_type": kind},
                "content": dict(request.get("content") or {}),
                "metadata": dict(request.get("metadata") or {}),
                "buffers": [base64.b64decode(b) for b in request.get("buffers") or []],
            }
            getattr(manager, kind)(None, None, msg)
        return {"status": "ok", "user_expressions": {}, "payload": []}

    def op_comm_info(self, req: Dict[str, Any]) -> Dict[str, Any]:
        manager = self.comm_manager
        target = req.get("target_name")
        comms = {
            comm_id: {"target_name": c.target_name}
            for comm_id, c in list((manager.comms if manager else {}).items())
            if target is None or c.target_name == target
        }
        return {"ok": True, "reply": {"comms": comms}}

    def op_complete(self, req: Dict[str, Any]) -> Dict[str, Any]:
        code = str(req.get("code", ""))
        pos = req.get("cursor_pos")
        cursor = len(code) if pos is None else int(pos)

        def complete(r: Any) -> Any:
            # jedi is not thread-safe: let the background warm-up finish first (it
            # would otherwise wait for this very request to end).
            warm = self.jedi_warm_up
            if warm is not None:
                self.gate.open()
                warm.join(timeout=8.0)
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

    def op_info(self, req: Dict[str, Any]) -> Dict[str, Any]:
        return {"ok": True, "reply": self.info()}

    def op_shutdown(self, req: Dict[str, Any]) -> Dict[str, Any]:
        return {"ok": True, "_then_exit": True}

    def exit_now(self) -> None:
        """Remove our files and leave at once (a running cell dies with us)."""
        log.info("shutting down")
        _remove_state_files(self.state_dir, os.getpid())
        os._exit(0)


def _without_agent_tail(tb: Any) -> Any:
    """``tb`` without the trailing entries that are frames of this file."""
    entries = []
    while tb is not None:
        entries.append(tb)
        tb = tb.tb_next
    me = os.path.abspath(__file__)
    while entries and os.path.abspath(entries[-1].tb_frame.f_code.co_filename) == me:
        entries.pop()
    rebuilt = None
    for entry in reversed(entries):
        rebuilt = types.TracebackType(rebuilt, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return rebuilt


def _interrupt_children() -> None:
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
        if pid == me:
            continue
        try:
            if os.getpgid(pid) == group:
                os.kill(pid, signal.SIGINT)
        except OSError:
            pass


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


def _decode_request(body: str) -> Any:
    """``B64`` inline, or ``@path`` of an uploaded JSON file (read, then deleted)."""
    if body.startswith("@"):
        path = body[1:]
        with open(path, "rb") as f:
            raw = f.read()
        try:
            os.unlink(path)
        except OSError:
            pass
        stripped = raw.strip()
        if not stripped.startswith(b"{"):
            stripped = base64.b64decode(stripped)  # an uploaded base64 body works too
        return json.loads(stripped.decode("utf-8"))
    return json.loads(base64.b64decode(body).decode("utf-8"))


# --------------------------------------------------------------------------- TCP server


class _Handler(socketserver.StreamRequestHandler):
    """One request: a line in, a line of ASCII JSON out, close."""

    timeout = 30.0
    server: _Server

    def handle(self) -> None:
        with self.server.agent.gate.busy():
            self._handle()

    def _handle(self) -> None:
        agent = self.server.agent
        line = self.rfile.readline(MAX_REQUEST_LINE + 1)
        exit_after = False
        try:
            if len(line) > MAX_REQUEST_LINE:
                resp: Dict[str, Any] = {"ok": False, "error": "request line too long"}
            else:
                resp = agent.handle_line(line)
            exit_after = bool(resp.pop("_then_exit", False))
        except Exception as exc:
            log.exception("request failed")
            resp = {"ok": False, "error": f"the agent could not handle the request: {exc}"}
        try:
            body = json.dumps(resp, ensure_ascii=True, default=_json_default)
        except (TypeError, ValueError) as exc:
            body = json.dumps({"ok": False, "error": f"unserializable answer: {exc}"})
        self.wfile.write(body.encode("ascii") + b"\n")
        self.wfile.flush()
        if exit_after:
            try:
                self.connection.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            agent.exit_now()


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        super().__init__(("127.0.0.1", 0), _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The default prints to sys.stderr, which is a cell's output here.
        log.exception("error while serving a request")


# --------------------------------------------------------------------------- start / daemon


def _write_private(path: str, text: str) -> None:
    """Write a 0600 file atomically (readers never see half a token)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _remove_state_files(state_dir: str, pid: int) -> None:
    try:
        with open(os.path.join(state_dir, "pid")) as f:
            if int(f.read().strip() or 0) != pid:
                return  # a newer agent owns the dir now
    except (OSError, ValueError):
        return
    for name in ("port", "token", "pid"):
        try:
            os.unlink(os.path.join(state_dir, name))
        except OSError:
            pass


def _close_inherited_fds(keep: int) -> None:
    """Close what the exec gave us (its pipes, sockets): the daemon must not hold them.

    Listing /proc/self/fd costs one call per open fd; closerange up to the fd limit
    costs one per possible fd (a million, in some containers).
    """
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        os.closerange(3, keep)
        os.closerange(keep + 1, 65536)
        return
    for fd in fds:
        if fd > 2 and fd != keep:
            try:
                os.close(fd)
            except OSError:
                pass  # the fd of the listdir itself, already closed


def _run_daemon(state_dir: str, ready_fd: int) -> None:
    """The daemon's body (grandchild of ``start``): serve until ``shutdown``."""
    _close_inherited_fds(keep=ready_fd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    log_fd = os.open(
        os.path.join(state_dir, "agent.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600
    )
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    log_stream = open(log_fd, "w", buffering=1, closefd=False)
    # A segfault in user C code kills the agent: leave the reason in the log.
    faulthandler.enable(file=log_stream)
    handler = logging.StreamHandler(log_stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.DEBUG if os.environ.get("MODBOX_AGENT_DEBUG") else logging.INFO)

    agent = Agent(state_dir, log_fd)
    signal.signal(signal.SIGINT, agent.on_sigint)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # Helper threads inherit a blocked SIGINT, so a SIGINT sent to the process is
    # delivered to the main thread and interrupts its blocking call.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    agent.io.install()
    server = _Server(agent)
    agent.port = server.server_address[1]
    threading.Thread(target=server.serve_forever, name="modbox-server", daemon=True).start()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    _write_private(os.path.join(state_dir, "token"), agent.token + "\n")
    _write_private(os.path.join(state_dir, "port"), f"{agent.port}\n")
    _write_private(os.path.join(state_dir, "pid"), f"{os.getpid()}\n")
    log.info("agent %s listening on 127.0.0.1:%d (pid %d)", agent.version, agent.port, os.getpid())
    os.write(ready_fd, (json.dumps(agent.info()) + "\n").encode())
    os.close(ready_fd)

    # The notebook's view of the process, not the agent's command line.
    sys.argv = [""]
    if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(AGENT_FILE):
        sys.path[0] = ""
    agent.setup_runner()
    agent.main_loop()


def _request(state_dir: str, payload: Dict[str, Any], timeout: float) -> Dict[str, Any]:
    """Talk to a running agent the way the bash line does (used by ``start``)."""
    with open(os.path.join(state_dir, "port")) as f:
        port = int(f.read().strip())
    with open(os.path.join(state_dir, "token")) as f:
        token = f.read().strip()
    body = base64.b64encode(json.dumps(payload).encode()).decode()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(f"{token} {body}\n".encode())
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    result: Dict[str, Any] = json.loads(b"".join(chunks).decode())
    return result


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive (it may be our own unreaped child in tests)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def _stop_existing(state_dir: str) -> None:
    """A (re)start means a fresh namespace: stop the agent that owns this dir."""
    try:
        with open(os.path.join(state_dir, "pid")) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return
    try:
        _request(state_dir, {"op": "shutdown"}, timeout=2.0)
    except (OSError, ValueError):
        pass
    deadline = time.monotonic() + 3.0
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    if _pid_alive(pid):
        # Only kill what is really an agent for this dir (the pid may have been reused).
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                mine = state_dir.encode() in f.read()
        except OSError:
            mine = False
        if mine:
            os.kill(pid, signal.SIGKILL)
    for name in ("port", "token", "pid"):
        try:
            os.unlink(os.path.join(state_dir, name))
        except OSError:
            pass


def _log_tail(state_dir: str) -> str:
    try:
        with open(os.path.join(state_dir, "agent.log"), "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 2000))
            return f.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


def cmd_start(state_dir: str) -> int:
    """``start``: daemonize, wait until it listens, print one JSON line."""
    state_dir = os.path.abspath(state_dir)
    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        os.chmod(state_dir, 0o700)
        _stop_existing(state_dir)
    except OSError as exc:
        print(json.dumps({"ok": False, "error": f"cannot prepare {state_dir}: {exc}"}))
        return 1
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # first child: new session, then fork again so we are no leader
        os.close(r)
        os.setsid()
        if os.fork() != 0:
            os._exit(0)
        code = 0
        try:
            _run_daemon(state_dir, w)
        except BaseException as exc:
            log.exception("the agent failed")
            traceback.print_exc()
            code = 1
            try:  # still starting: tell `start` why (after the ready line, fd w is closed)
                reason = f"The Modbox agent could not start: {type(exc).__name__}: {exc}"
                os.write(w, (json.dumps({"ok": False, "error": reason}) + "\n").encode())
            except OSError:
                pass
        os._exit(code)
    os.close(w)
    os.waitpid(pid, 0)
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    buf = b""
    while b"\n" not in buf:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        ready, _, _ = select.select([r], [], [], remaining)
        if not ready:
            break
        chunk = os.read(r, 65536)
        if not chunk:
            break
        buf += chunk
    os.close(r)
    if b"\n" in buf:
        line = buf.split(b"\n", 1)[0].decode()
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
        try:
            return 0 if json.loads(line).get("ok") else 1
        except (ValueError, AttributeError):
            return 1
    why = f"did not report within {START_TIMEOUT_SECONDS:.0f} s" if not buf else "failed"
    tail = _log_tail(state_dir)
    msg = f"The Modbox agent {why}; {state_dir}/agent.log says: {tail or '(nothing)'}"
    print(json.dumps({"ok": False, "error": msg}))
    return 1


def main(argv: Optional[List[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) == 3 and args[0] == "start" and args[1] == "--state-dir":
        return cmd_start(args[2])
    sys.stderr.write("usage: agent.py start --state-dir DIR\n")
    return 2


if __name__ == "__main__":
    sys.exit(main())
