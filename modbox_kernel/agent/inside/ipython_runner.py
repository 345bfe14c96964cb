"""Cells through an IPython ``InteractiveShell``, modelled on ipykernel's ZMQ shell.

``core.Agent.setup_runner`` calls :func:`make_ipython_runner` on the main thread after
``start`` has answered (importing IPython is slow); the shell's display publisher,
display hook and traceback hook turn what cells produce into agent events, and its
compiler names cells as ipykernel does (``naming``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from .kernelmagics import check_gui, kernel_magics
from .naming import cell_file_name
from .runner import Runner
from .tracebacks import without_agent_tail
from .wire import encode_mimebundle

if TYPE_CHECKING:
    from .cells import Cell
    from .core import Agent

log = logging.getLogger("modbox.agent")

#: IPython writes each cell's input to its history database right after the cell, from
#: a thread of its own that then holds the GIL while the cell's answer is on its way
#: (about 0.3 ms of every cell, measured). The agent batches the writes instead: IPython
#: writes by itself every ``HISTORY_BATCH`` cells, and the agent asks for a write once
#: ``HISTORY_WRITE_AFTER`` s after a cell ended, by when a run of quick cells has its
#: answers out. What ``%history`` and its search read is the same: IPython writes the
#: rest out before it reads the database.
HISTORY_BATCH = 100
HISTORY_WRITE_AFTER = 0.2


def make_ipython_runner(agent: Agent) -> Runner:
    """Build the InteractiveShell subclass (IPython is imported here, lazily)."""
    from IPython.core import page, payloadpage
    from IPython.core.compilerop import CachingCompiler
    from IPython.core.displayhook import DisplayHook
    from IPython.core.displaypub import DisplayPublisher
    from IPython.core.error import StdinNotImplementedError as IPyStdinError
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
                    "data": encode_mimebundle(data),
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
                self.msg["data"] = encode_mimebundle(format_dict)
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

        @property
        def parent_header(self) -> Dict[str, Any]:
            # ipykernel's shell has it: the header of the request being handled.
            kernel = getattr(self, "kernel", None)
            return dict(kernel.parent_header) if kernel is not None else {}

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
            # %gui, and %matplotlib for its backend's loop: see kernelmagics.check_gui.
            check_gui(gui)
            self.active_eventloop = gui

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
            # the agent (ipykernel's C-level handler leaves none), as does the
            # StdinNotImplementedError of its input(). Users must not see them,
            # rendering them makes IPython parse that agent module, and %debug (which
            # reads what IPython just stored in sys.last_*) must not open it either.
            tb = without_agent_tail(tb)
            sys.last_traceback = tb
            if value is not None and tb is not None:
                value.__traceback__ = tb
            return etype, value, tb

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
            self._history_due: Any = None  # the loop's timer of the next history write
            history = self.shell.history_manager
            if history is not None:
                history.db_cache_size = HISTORY_BATCH
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
            shell.register_magics(kernel_magics(shell))  # %autosave, %less, … (ipykernel's)
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
            self._before(cell)
            res = self.shell.run_cell(
                cell.code, store_history=cell.store_history, silent=cell.silent
            )
            return self._reply(cell, res)

        async def run_async(self, cell: Cell) -> Dict[str, Any]:
            """As ipykernel: a cell with top-level ``await`` runs as a task of the
            agent's loop (so it can await what other tasks do); any other cell runs
            synchronously, inside that running loop."""
            shell = self.shell
            try:
                transformed = shell.transform_cell(cell.code)
                preprocessing_exc = None
            except Exception:
                transformed = cell.code
                preprocessing_exc = sys.exc_info()
            if not shell.should_run_async(
                cell.code,
                transformed_cell=transformed,
                preprocessing_exc_tuple=preprocessing_exc,
            ):
                return self.run(cell)
            self._before(cell)
            shell._last_traceback = None
            shell._last_traceback_during_displayhook = False
            task = asyncio.ensure_future(
                shell.run_cell_async(
                    cell.code,
                    store_history=cell.store_history,
                    silent=cell.silent,
                    transformed_cell=transformed,
                    preprocessing_exc_tuple=preprocessing_exc,
                )
            )
            with agent.sigint_cancels(task):
                try:
                    res = await task
                except asyncio.CancelledError:
                    raise KeyboardInterrupt from None
            return self._reply(cell, res)

        def after_cell(self) -> None:
            if self._history_due is None and agent.loop is not None:
                self._history_due = agent.loop.call_later(HISTORY_WRITE_AFTER, self._write_history)

        def _write_history(self) -> None:
            self._history_due = None
            history = self.shell.history_manager
            if history is None or not history.enabled:
                return
            save_flag = getattr(history, "save_flag", None)
            if getattr(history, "using_thread", False) and save_flag is not None:
                save_flag.set()  # IPython's saving thread writes, as after each cell
            else:
                history.writeout_cache()

        def _before(self, cell: Cell) -> None:
            shell = self.shell
            # The kernel owns the count: tracebacks and Out[n] must show its number.
            shell.execution_count = cell.execution_count
            if cell.store_history and not cell.silent:
                self._align_input_history(cell.execution_count)

        def _reply(self, cell: Cell, res: Any) -> Dict[str, Any]:
            shell = self.shell
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

        def complete(self, code: str, cursor_pos: int, *, quick: bool = False) -> Dict[str, Any]:
            # ipykernel's default path (its "experimental" completions API): the legacy
            # shell.complete() finds nothing while jedi is on in recent IPython.
            # ``quick``: without jedi (IPython's own matchers: names, attributes, keys,
            # paths), for while jedi is not warm yet (see ops.op_complete).
            try:
                from IPython.core.completer import provisionalcompleter, rectify_completions
            except ImportError:
                return self._complete_legacy(code, cursor_pos)
            completer = self.shell.Completer
            use_jedi = completer.use_jedi
            if quick:
                completer.use_jedi = False
            try:
                with provisionalcompleter():
                    raw = completer.completions(code, cursor_pos)
                    completions = list(rectify_completions(code, raw))
            finally:
                completer.use_jedi = use_jedi
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
