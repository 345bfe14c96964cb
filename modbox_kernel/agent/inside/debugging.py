"""The debugger inside the sandbox: a Debug Adapter Protocol client of debugpy.

The kernel relays each ``debug_request`` of the frontend as a ``debug`` op
(``ops.Requests.op_debug`` calls :meth:`Debugger.handle` on a server thread) and reads
debugpy's events with the ``debug_events`` op, a cursor over :attr:`Debugger.log` as
``background`` is over the background log. The requests only Jupyter knows
(``dumpCell``, ``debugInfo``, ``inspectVariables``, ``richInspectVariables``,
``copyToGlobals``, ``modules``, ``source``) are answered here, with the meaning the
stock kernel gives them (ipykernel's ``debugger.py``); the rest go to debugpy.

Why inside the agent: cells run on the agent's main thread, so that is the process
debugpy must trace. ``debugpy.listen`` starts debugpy's adapter (a child process
listening on loopback) at the first ``initialize``; this module connects to it as the
DAP client (``dapclient.DapConnection``) and never stops it (debugpy cannot listen
twice in one process), so a later ``initialize`` connects again. The agent's own
threads are marked as debugger threads (``dapclient.untraced``): they are never
suspended at a breakpoint, which is what keeps requests flowing while a cell is
stopped.
"""

from __future__ import annotations

import ast
import importlib.util
import logging
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Set

from . import location
from .cells import background_log, trim_background
from .dapclient import DapConnection, debug_info, response, untraced
from .debugvars import accept_variable, namespace_variables
from .naming import cell_file_name, cell_folder

if TYPE_CHECKING:
    from .core import Agent

log = logging.getLogger("modbox.agent")

#: Set to 1 in the sandbox's environment to run as if debugpy were not installed.
DISABLE_ENV = "MODBOX_AGENT_NO_DEBUGGER"

#: How long an interrupt while debugging keeps trying to reach the cell's code, and
#: how often it signals meanwhile.
INTERRUPT_SECONDS = 5.0
INTERRUPT_RETRY_SECONDS = 0.02


def unavailable_reason(runner_mode: str) -> Optional[str]:
    """Why this sandbox cannot debug, or None when it can (``info`` reports it)."""
    if os.environ.get(DISABLE_ENV) == "1":
        return f"{DISABLE_ENV}=1 is set in the sandbox"
    if os.environ.get("MODBOX_AGENT_NO_IPYTHON") == "1" or runner_mode == "none":
        return "the sandbox runs cells without IPython"
    try:
        if importlib.util.find_spec("debugpy") is None:
            return "debugpy is not installed in the sandbox (pip install debugpy)"
    except (ImportError, ValueError) as exc:
        return f"debugpy cannot be imported in the sandbox: {exc}"
    return None


class Debugger:
    """One agent's debugger: the connection to debugpy and what Jupyter asks of it."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        #: debugpy's events (``{"type": "debug_event", "content": <DAP event>}``).
        self.log = background_log()
        self.started = False
        self.endpoint: Optional[tuple[str, int]] = None
        self.adapter_pids: Set[int] = set()
        self.breakpoints: Dict[str, List[Dict[str, Any]]] = {}
        self.stopped_threads: Set[int] = set()
        self._dap: Optional[DapConnection] = None
        self._attached = False
        self._removed_cleanup: Dict[int, Any] = {}
        self._code_dir = ""  # debugpy's folder, once imported

    # -- the kernel's requests
    def handle(self, request: Dict[str, Any]) -> Dict[str, Any]:
        """Answer one DAP request (server thread)."""
        command = request.get("command")
        if not isinstance(command, str):
            return response(request, False, message="a debug request needs a command")
        reason = unavailable_reason(self.agent.mode)
        if reason is not None:
            return response(request, False, message=f"The debugger is not available: {reason}")
        if command == "initialize" and not self.started:
            problem = self._start()
            if problem:
                return response(request, False, message=problem)
            self.started = True
        static = getattr(self, f"_static_{command}", None)
        if static is not None:
            reply: Dict[str, Any] = static(request)
        elif not self.started:
            reply = response(request, False, message="the debugger has not been initialized")
        else:
            own = getattr(self, f"_on_{command}", None)
            reply = own(request) if own is not None else self.forward(request)
            if command == "continue" and reply.get("success"):
                # debugpy sends no ``continued`` event for the frontend's own continue.
                body = reply.get("body") or {}
                if body.get("allThreadsContinued", True):
                    self.stopped_threads = set()
                else:
                    arguments = request.get("arguments") or {}
                    self.stopped_threads.discard(int(arguments.get("threadId", 0)))
        if command == "disconnect":
            self._stop()
        return reply

    # -- interrupts while debugging
    @property
    def loaded(self) -> bool:
        """debugpy runs in this process (from the first start on, for good)."""
        return self.endpoint is not None

    def in_debugger_code(self, frame: Any) -> bool:
        """Whether ``frame`` (where a SIGINT landed) is debugpy's own code."""
        return bool(
            self._code_dir
            and frame is not None
            and frame.f_code.co_filename.startswith(self._code_dir)
        )

    def interrupt(self) -> None:
        """Interrupt the running cell while debugging (server thread).

        A cell stopped at a breakpoint waits inside debugpy, where a KeyboardInterrupt
        would end the tracing of the cell's thread (its breakpoints would never stop it
        again). So stopped threads are resumed first, and the SIGINT is sent again until
        it lands in the cell's code (the agent's handler ignores it inside debugpy).
        """
        untraced(threading.Thread(target=self._interrupt, daemon=True)).start()

    def _interrupt(self) -> None:
        agent = self.agent
        raised = agent.sigints_raised
        deadline = time.monotonic() + INTERRUPT_SECONDS
        while agent.sigints_raised == raised and agent.in_user_code:
            if time.monotonic() > deadline:
                log.warning("the interrupt did not reach the cell's code while debugging")
                return
            stopped = set(self.stopped_threads)
            if stopped:
                self._own("continue", threadId=min(stopped))
                self.stopped_threads = set()
            signal.pthread_kill(agent.main_ident, signal.SIGINT)
            time.sleep(INTERRUPT_RETRY_SECONDS)

    # -- starting and stopping
    def _start(self) -> Optional[str]:
        if self.endpoint is None:
            with self.agent.cond:
                busy = self.agent.current is not None
            if busy:
                # debugpy must start on the main thread, which the cell holds: say so now
                # rather than queue a start that would run (unasked) once the cell ends.
                return "the debugger can only start while no cell runs; try again then"
            try:
                self.agent.call_on_main(self._listen)
            except TimeoutError:
                return "the debugger can only start while no cell runs; try again then"
            except Exception as exc:
                log.exception("debugpy.listen failed")
                return f"debugpy could not start in the sandbox: {exc}"
        if self.endpoint is None:
            return "debugpy could not start in the sandbox (see the agent's log)"
        try:
            self._dap = DapConnection(self.endpoint, self._on_event, self._closed)
        except OSError as exc:
            return f"could not reach debugpy in the sandbox: {exc}"
        self._attached = False
        self._keep_leading_empty_lines(True)
        return None

    def _listen(self) -> None:
        """Main thread: start debugpy's adapter and tracing in this process (once: a
        start that ran late, after its request gave up, is still the one)."""
        if self.endpoint is not None:
            return
        import debugpy

        os.makedirs(cell_folder(), mode=0o700, exist_ok=True)
        before = _children()
        self._code_dir = os.path.dirname(os.path.abspath(debugpy.__file__))
        host, port = debugpy.listen(("127.0.0.1", 0))
        # Interrupts SIGINT the cell's children; debugpy's adapter is not one of them.
        self.adapter_pids = _children() - before
        log.info("debugpy %s listening on %s:%d", debugpy.__version__, host, port)
        self.endpoint = (str(host), int(port))

    def _closed(self, dap: DapConnection) -> None:
        """The reader saw the connection end (debugpy gone, or our own close)."""
        if self._dap is dap:
            self._stop()

    def _stop(self) -> None:
        dap, self._dap = self._dap, None
        if dap is not None:
            dap.close()
        self.started = False
        self.breakpoints = {}
        self.stopped_threads = set()
        self._keep_leading_empty_lines(False)

    def _keep_leading_empty_lines(self, keep: bool) -> None:
        """While debugging, IPython must not drop a cell's leading empty lines, or the
        lines of the running code and of the dumped cell would differ."""
        shell = getattr(self.agent.runner, "shell", None)
        if shell is None:
            return
        from IPython.core.inputtransformer2 import leading_empty_lines

        transforms = shell.input_transformer_manager.cleanup_transforms
        if keep and leading_empty_lines in transforms:
            index = transforms.index(leading_empty_lines)
            self._removed_cleanup[index] = transforms.pop(index)
        elif not keep:
            for index in sorted(self._removed_cleanup):
                transforms.insert(index, self._removed_cleanup.pop(index))

    # -- talking to debugpy
    def forward(self, request: Dict[str, Any]) -> Dict[str, Any]:
        """Send ``request`` to debugpy and wait for its response."""
        dap = self._dap
        if dap is None:
            return response(request, False, message="the debugger is not connected")
        return dap.request(request)

    def _own(self, command: str, **arguments: Any) -> Dict[str, Any]:
        dap = self._dap
        if dap is None:
            return {"success": False, "message": "the debugger is not connected"}
        return dap.own(command, **arguments)

    def _on_event(self, message: Dict[str, Any]) -> None:
        """Reader thread: track stopped threads as the stock kernel does; publish."""
        event, body = message.get("event"), message.get("body") or {}
        if event == "stopped":
            if body.get("allThreadsStopped"):
                # Which threads stopped is asked of debugpy, whose answer the reader
                # thread must read: ask from another one, then tell the frontend.
                untraced(
                    threading.Thread(target=self._all_stopped, args=(message,), daemon=True)
                ).start()
                return
            self.stopped_threads.add(int(body.get("threadId", 0)))
        elif event == "continued":
            if body.get("allThreadsContinued"):
                self.stopped_threads = set()
            else:
                self.stopped_threads.discard(int(body.get("threadId", 0)))
        self.publish(message)

    def _all_stopped(self, event: Dict[str, Any]) -> None:
        reply = self._own("threads")
        for thread in (reply.get("body") or {}).get("threads", []):
            if thread.get("name") != "IPythonHistorySavingThread":
                self.stopped_threads.add(int(thread["id"]))
        self.publish(event)

    def publish(self, message: Dict[str, Any]) -> None:
        agent = self.agent
        with agent.cond:
            if self.log.add({"type": "debug_event", "content": message}):
                trim_background(self.log)
                agent.cond.notify_all()

    # -- requests answered here, debugger started or not (ipykernel's "static" ones)
    def _static_debugInfo(self, request: Dict[str, Any]) -> Dict[str, Any]:
        return debug_info(
            request,
            started=self.started,
            cell_prefix=cell_folder() + os.sep,
            breakpoints=self.breakpoints,
            stopped=self.stopped_threads,
        )

    def _static_inspectVariables(self, request: Dict[str, Any]) -> Dict[str, Any]:
        # On this thread, as the stock kernel answers it on its control thread: the
        # main thread may be running a cell, or be stopped at a breakpoint.
        variables = namespace_variables()
        return response(request, body={"variables": variables})

    def _static_richInspectVariables(self, request: Dict[str, Any]) -> Dict[str, Any]:
        arguments = request.get("arguments") or {}
        name = str(arguments.get("variableName", ""))
        if not name.isidentifier():
            special = name in ("special variables", "function variables")
            return response(request, special, body={"data": {}, "metadata": {}})
        data: Dict[str, Any] = {}
        metadata: Dict[str, Any] = {}
        if not self.stopped_threads:
            shell = self.agent.runner.shell  # type: ignore[union-attr]
            result = shell.user_expressions({name: name})[name]
            if result.get("status") == "ok":
                data, metadata = result.get("data", {}), result.get("metadata", {})
        else:
            reply = self._own(
                "evaluate",
                expression=f"get_ipython().display_formatter.format({name})",
                frameId=arguments.get("frameId"),
                context="clipboard",
            )
            if reply.get("success"):
                try:
                    data, metadata = ast.literal_eval(reply["body"]["result"])
                except (ValueError, SyntaxError, KeyError, TypeError):
                    data, metadata = {}, {}
        body = {"data": data, "metadata": {k: v for k, v in metadata.items() if k in data}}
        return response(request, body=body)

    def _static_copyToGlobals(self, request: Dict[str, Any]) -> Dict[str, Any]:
        arguments = request.get("arguments") or {}
        dst = str(arguments.get("dstVariableName", ""))
        src = str(arguments.get("srcVariableName", ""))
        if not dst.isidentifier() or not src.isidentifier():
            message = "dstVariableName and srcVariableName must be valid identifiers"
            return response(request, False, message=message)
        return self._own(
            "setExpression",
            expression=f"globals()['{dst}']",
            value=src,
            frameId=arguments.get("srcFrameId"),
        )

    def _static_modules(self, request: Dict[str, Any]) -> Dict[str, Any]:
        modules = list(sys.modules.copy().values())
        arguments = request.get("arguments") or {}
        start = int(arguments.get("startModule", 0) or 0)
        count = int(arguments.get("moduleCount", 0) or len(modules))
        found = []
        for index, module in enumerate(modules[start : start + count], start):
            path = getattr(getattr(module, "__spec__", None), "origin", None)
            if isinstance(path, str) and path.endswith(".py"):
                found.append({"id": index, "name": module.__name__, "path": path})
        return response(request, body={"modules": found, "totalModules": len(modules)})

    # -- requests that need a started debugger, answered (partly) here
    def _on_dumpCell(self, request: Dict[str, Any]) -> Dict[str, Any]:
        code = str((request.get("arguments") or {}).get("code", ""))
        path = cell_file_name(code)
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(code)
        return response(request, body={"sourcePath": path})

    def _on_setBreakpoints(self, request: Dict[str, Any]) -> Dict[str, Any]:
        arguments = request.get("arguments") or {}
        path = str((arguments.get("source") or {}).get("path", ""))
        self.breakpoints[path] = list(arguments.get("breakpoints") or [])
        reply = self.forward(request)
        if reply.get("success"):
            # debugpy may move a breakpoint to another line: keep where it landed.
            points = (reply.get("body") or {}).get("breakpoints", [])
            self.breakpoints[path] = [{"line": p["line"]} for p in points if "line" in p]
        return reply

    def _on_source(self, request: Dict[str, Any]) -> Dict[str, Any]:
        path = str(((request.get("arguments") or {}).get("source") or {}).get("path", ""))
        try:
            with open(path, encoding="utf-8") as f:
                return response(request, body={"content": f.read()})
        except (OSError, UnicodeDecodeError):
            return response(request, False, message="source unavailable", body={})

    def _on_variables(self, request: Dict[str, Any]) -> Dict[str, Any]:
        reply = self.forward(request)
        body = reply.get("body")
        if isinstance(body, dict) and isinstance(body.get("variables"), list):
            body["variables"] = [v for v in body["variables"] if accept_variable(v.get("name", ""))]
        return reply

    def _on_attach(self, request: Dict[str, Any]) -> Dict[str, Any]:
        assert self.endpoint is not None
        arguments = dict(request.get("arguments") or {})
        host, port = self.endpoint
        arguments["connect"] = {"host": host, "port": port}
        # The agent's own code and everything imported before the first cell are not
        # the notebook's: no stepping into them, no frames of them in stack traces.
        own = [location.ROOT + os.sep + "**", *self.agent.own_files]
        arguments["rules"] = [{"path": path, "include": False} for path in own]
        request = {**request, "arguments": arguments}
        if self._attached:
            return self.forward(request)
        # The first attach: debugpy answers only after the configuration is done, which
        # it asks for with its ``initialized`` event (the stock kernel's sequence).
        dap = self._dap
        if dap is None:
            return response(request, False, message="the debugger is not connected")
        problem = dap.send(request)
        if problem:
            return response(request, False, message=problem)
        if not dap.wait_initialized(answered=request):
            return response(request, False, message="debugpy did not initialize in time")
        if dap.initialized_seq is None:  # debugpy answered (a refusal) instead
            return dap.response(request)
        dap.own("configurationDone")
        reply = dap.response(request)
        self._attached = bool(reply.get("success"))
        return reply

    def _on_disconnect(self, request: Dict[str, Any]) -> Dict[str, Any]:
        # The debuggee is the notebook's Python: ending the debugging session must never
        # end it (and debugpy's adapter must stay, to serve the next session).
        arguments = {**(request.get("arguments") or {}), "terminateDebuggee": False}
        return self.forward({**request, "arguments": arguments})

    def _on_configurationDone(self, request: Dict[str, Any]) -> Dict[str, Any]:
        # Sent to debugpy at the first attach already; later ones change nothing.
        return response(request)


def _children() -> Set[int]:
    """The pids of this process's children (from /proc)."""
    me = os.getpid()
    found: Set[int] = set()
    try:
        names = [n for n in os.listdir("/proc") if n.isdigit()]
    except OSError:
        return found
    for name in names:
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 1 and int(fields[1]) == me:
            found.add(int(name))
    return found
