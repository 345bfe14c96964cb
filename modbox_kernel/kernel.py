"""ModboxKernel: the Jupyter protocol on one side, a :class:`SandboxSession` on the other.

ipykernel's ``IPKernelApp`` instantiates this class (see ``kernelapp.py``) and calls the
``do_*`` handlers on the main thread, one at a time; ``interrupt_request`` and
``do_shutdown`` arrive on the Control thread. Nothing here knows about HTTP (the
session does) or about agent events (the relay, ``relay.py``, publishes them). What
this module adds is Jupyter behaviour (``docs/jupyter-traps.md`` explains each trap):

* every ``do_execute`` returns a reply and publishes an ``error`` output on failure
  (an escaping exception would leave clients waiting forever);
* interrupts never kill the kernel (the naive async wrapper dies on SIGINT): SIGINT and
  ``interrupt_request`` both go to the running cell's control (``cellcontrol.py``),
  which asks the agent to raise ``KeyboardInterrupt`` in the user's code;
* ``input()`` is answered through the stdin channel without blocking the event loop;
* the first cell waits for the sandbox and shows progress while it does;
* a malformed ``MODBOX_*`` setting (``settings.py``) is an error in every cell, with
  the kernel alive, instead of a kernel that dies while it is built.
"""

from __future__ import annotations

import asyncio
import base64
import os
import platform
import signal
from collections.abc import Callable
from typing import Any

import zmq
from ipykernel._version import kernel_protocol_version

from . import __version__, magic, protocol
from .cellcontrol import CellControl, InputCancelled, cell_time_limit
from .commforward import CommForwarder, ParentOrder
from .debugger import DebugRelay, predicted_available
from .embedded import discard_early
from .errors import ModboxError
from .execution import CellExecution
from .filesync import SyncSettings
from .idleoutput import IdleOutput
from .kernelcontrol import ControlRequests
from .relay import OutputRelay, Publish
from .session import SandboxSession, SessionConfig
from .settings import EnvSettings, KernelSettings
from .widgetecho import OutputWidgetEchoes
from .workdir import check_root


class ModboxKernel(KernelSettings, ControlRequests):
    """A Python kernel whose cells run in a Modbox sandbox."""

    implementation = "modbox_kernel"
    implementation_version = __version__
    banner = (
        f"Modbox Python {__version__}: every cell runs in an isolated Modbox sandbox.\n"
        "Variables, files and installed packages live in the sandbox for this session."
    )
    language_info = {
        "name": "python",
        "version": platform.python_version(),
        "mimetype": "text/x-python",
        "file_extension": ".py",
        "codemirror_mode": {"name": "ipython", "version": 3},
        "pygments_lexer": "ipython3",
        "nbconvert_exporter": "python",
    }

    # -- lifecycle ------------------------------------------------------------------

    def __init__(self, **kwargs: Any) -> None:
        # Before the traits: their defaults read it (a bad value is kept as a problem).
        self._env = EnvSettings()
        super().__init__(**kwargs)
        folder = _working_directory()
        if folder is not None and self.copy_workdir:
            problem = check_root(folder, self.copy_root)
            if problem:
                self._env.add_problem("MODBOX_COPY_ROOT", problem)
        self.sandbox = SandboxSession(
            SessionConfig(
                backend=self.backend,
                api_url=self.api_url,
                api_token=self.api_token or None,
                workspace_id=self.workspace_id or None,
                image_id=self.image_id or None,
                image=self.image or None,
                ttl_seconds=self.ttl_seconds,
                env_vars=dict(self.sandbox_env),
                startup_timeout=self.startup_timeout,
                copy_folder=folder if self.copy_workdir else None,
                copy_limit=max(0, self.copy_limit),
                copy_root=self.copy_root,
                sync=SyncSettings(
                    mode=self.sync if self.sync in ("cell", "shutdown", "never") else "cell",
                    file_limit=max(0, self.sync_file_limit),
                    cell_limit=max(0, self.sync_limit),
                ),
            )
        )
        # Threads' and timers' output while no cell runs, published as ipykernel does.
        self._last_shell_parent: dict[str, Any] = {}
        self._parents = ParentOrder()
        self.idle_listener = IdleOutput(self.sandbox, lambda: self._relay_under(None))
        self.comms = CommForwarder(self.sandbox, self._relay_under)
        self.echoes = OutputWidgetEchoes()
        self.cell_control = CellControl(self._interrupt_agent)
        self.execution = CellExecution(self.sandbox, self.cell_control, problems=self._env.problems)
        self.magic = magic.ModboxMagic(self.sandbox, folder)
        # JupyterLab's debugger, relayed to debugpy in the sandbox (debugger.py).
        self.debug_relay = DebugRelay(
            self.sandbox, self._publish_debug_event, problems=self._env.problems
        )
        self._debug_parent: dict[str, Any] = {}
        self._allow_stdin = False
        self._watch_exit()
        for msg_type in protocol.COMM_EVENTS:
            self.shell_handlers[msg_type] = self._comm_message

    def start(self) -> None:
        super().start()
        # Provisioning starts now, in the background, so kernel_info is answered at
        # once and the first cell usually finds the sandbox ready. With a malformed
        # setting nothing starts: every cell says what to fix.
        if not self._env.problems:
            self.io_loop.add_callback(self.sandbox.start)
            if self.idle_output:
                self.io_loop.add_callback(self.idle_listener.start)
        else:
            discard_early()  # the service __main__ started for us will not be used

    @property
    def kernel_info(self) -> dict[str, Any]:
        # Not ipykernel's property: it imports debugpy (~0.1 s of CPU per start) to learn
        # whether the *kernel* process could debug. Ours debugs in the sandbox: its agent
        # says whether it can, and before it exists the embedded backend can predict it.
        can_debug = self.debug_relay.available
        if can_debug is None:
            embedded = self.sandbox.config.resolved_backend == "local"
            can_debug = predicted_available(embedded, self.sandbox_env)
        info: dict[str, Any] = {
            "protocol_version": kernel_protocol_version,
            "implementation": self.implementation,
            "implementation_version": self.implementation_version,
            "language_info": self.language_info,
            "banner": self.banner,
            "help_links": self.help_links,
            "supported_features": ["debugger"] if can_debug else [],
        }
        version = self.sandbox.agent_info.get("python_version")
        if version:
            info["language_info"] = {**self.language_info, "version": version}
        return info

    def set_parent(self, ident: Any, parent: Any, channel: str = "shell") -> None:
        if channel == "shell" and self._parents.stale(parent):
            return
        super().set_parent(ident, parent, channel)
        if channel == "shell":
            # ipykernel's streams publish what threads write between cells under the
            # last shell request (a global beside the per-task context): so do we.
            self._last_shell_parent = parent

    def _publisher(self, parent: Callable[[], dict[str, Any]]) -> Publish:
        """An IOPub publish function; ``parent()`` gives each message's parent."""

        def publish(
            msg_type: str,
            content: dict[str, Any],
            metadata: dict[str, Any] | None,
            buffers: list[bytes] | None,
        ) -> None:
            if self.session is None:  # not connected yet: nobody to tell
                return
            under = parent()
            self.echoes.published(msg_type, content, under)
            self.session.send(
                self.iopub_socket,
                msg_type,
                content,
                under,
                metadata=metadata,
                buffers=list(buffers) if buffers else None,
            )

        return publish

    def _relay_under(self, parent: dict[str, Any] | None) -> OutputRelay:
        """A relay publishing under ``parent``: a queued comm message (``commforward``),
        or with None the last shell request at the time of sending -- for what the
        sandbox produced while no cell ran (``idleoutput``)."""
        publish = self._publisher(lambda: self._last_shell_parent if parent is None else parent)
        return OutputRelay(publish, silent=False, output_limit=max(0, self.output_limit))

    def _relay(self, silent: bool) -> OutputRelay:
        """The relay of one request's output to IOPub (under the request being handled)."""
        return OutputRelay(
            self._publisher(lambda: self.get_parent("shell")),
            silent=silent,
            output_limit=max(0, self.output_limit),
            execution_count=self.execution_count,
            answer_input=self._answer_input,
            rewrite_error=self.cell_control.rewrite_error,
        )

    # -- comms (ipywidgets): the frontend's side ------------------------------------

    async def _comm_message(self, stream: Any, ident: Any, parent: dict[str, Any]) -> None:
        """A frontend's comm_open / comm_msg / comm_close: on to the sandbox's comms.

        It travels like a cell (the agent runs the comm handlers instead of code), so
        what they publish or print streams to IOPub with this message as parent, as
        under ipykernel. Without a sandbox the comms it names are gone: nothing to do.
        """
        self.echoes.received(parent)
        if not self.sandbox.ready:
            return
        request = protocol.CellRequest(
            code="",
            store_history=False,
            execution_count=self.execution_count,
            output_limit=max(0, self.output_limit),
            parent_header=protocol.header_of(parent),
            comm={
                "msg_type": parent["header"]["msg_type"],
                "content": dict(parent.get("content") or {}),
                "metadata": dict(parent.get("metadata") or {}),
                "buffers": [
                    base64.b64encode(bytes(b)).decode("ascii") for b in parent.get("buffers") or []
                ],
            },
        )
        await self.comms.forward(request, parent)

    async def comm_info_request(self, stream: Any, ident: Any, parent: Any) -> None:
        comms: dict[str, Any] = {}
        if self.sandbox.ready:
            target = (parent.get("content") or {}).get("target_name")
            try:
                reply = await self.sandbox.query("comm_info", target_name=target)
                comms = dict(reply.get("comms") or {})
            except ModboxError as exc:
                self.log.warning("comm_info failed: %s", exc)
        if self.session:
            content = {"status": "ok", "comms": comms}
            self.session.send(stream, "comm_info_reply", content, parent, ident)

    def finish_metadata(self, parent: Any, metadata: Any, reply_content: Any) -> Any:
        # The cell's time, CPU and peak memory in the sandbox, beside the stock fields.
        usage = self.execution.take_usage()
        if usage is not None:
            metadata["modbox"] = usage
            self.magic.last_cell = usage
        return metadata

    # -- interrupts (docs/jupyter-traps.md, "Interrupts") ---------------------------

    def pre_handler_hook(self) -> None:
        loop = asyncio.get_event_loop()

        def on_sigint(signum: int, frame: Any) -> None:
            # call_soon_threadsafe wakes the selector; plain call_soon would not.
            loop.call_soon_threadsafe(self.cell_control.interrupt)

        self.saved_sigint_handler = signal.signal(signal.SIGINT, on_sigint)

    async def _interrupt_agent(self) -> None:
        await self.sandbox.interrupt()

    # -- execute --------------------------------------------------------------------

    async def do_execute(
        self,
        code: str,
        silent: bool,
        store_history: bool = True,
        user_expressions: dict[str, str] | None = None,
        allow_stdin: bool = False,
        *,
        cell_meta: dict[str, Any] | None = None,
        cell_id: str | None = None,
    ) -> dict[str, Any]:
        self._allow_stdin = allow_stdin
        if not store_history and not silent:
            # Kernel.execute_request counted this request already; IPython counts only
            # cells that go into history.
            self.execution_count -= 1
        code, limit, warning = cell_time_limit(code, self.cell_timeout)
        if warning:
            self.log.warning("%s", warning)
        cell = protocol.CellRequest(
            code=code,
            silent=silent,
            store_history=store_history,
            user_expressions=dict(user_expressions or {}),
            allow_stdin=allow_stdin,
            execution_count=self.execution_count,
            output_limit=max(0, self.output_limit),
            parent_header=protocol.header_of(self.get_parent("shell")),
        )
        await self.comms.drained()  # comm messages sent before this cell go first
        relay = self._relay(silent)
        lines = magic.parse(code)
        if lines is not None:  # %modbox: the kernel's own, never sent to the sandbox
            reply = await self.execution.run_magic(
                self.execution_count, lambda: self.magic.run(lines, relay), relay
            )
        else:
            reply = await self.execution.run(cell, relay, limit)
        await self.echoes.settled(str(cell.parent_header.get("msg_id", "")))  # widgetecho.py
        return reply

    # -- stdin (docs/jupyter-traps.md, "stdin") ---------------------------------------

    async def _answer_input(self, event: dict[str, Any]) -> None:
        """A cell's ``input_request``: ask the frontend, send the answer to the agent."""
        cell = self.sandbox.running_cell
        try:
            value = await self.ask_frontend(
                str(event.get("prompt", "")), bool(event.get("password", False))
            )
        except InputCancelled:
            return  # interrupted: the agent raises KeyboardInterrupt in input()
        except Exception:
            value = protocol.INPUT_EOF  # the agent raises EOFError, as ipykernel does
        if cell is not None:
            await self.sandbox.send_input(cell, value)

    async def ask_frontend(self, prompt: str, password: bool) -> str:
        """Send ``input_request`` on stdin and await the answer without blocking the loop.

        ipykernel's own ``raw_input`` polls synchronously and would freeze the event
        loop (no interrupts, no streaming) while the user types.
        """
        if not self._allow_stdin:
            raise RuntimeError("input was requested but this frontend does not support stdin")
        assert self.session is not None
        parent = self.get_parent("shell")
        ident = self._get_shell_context_var(self._shell_parent_ident)
        while True:  # purge stale replies
            try:
                self.stdin_socket.recv_multipart(zmq.NOBLOCK)
            except zmq.ZMQError:
                break
        self.session.send(
            self.stdin_socket,
            "input_request",
            {"prompt": prompt, "password": password},
            parent,
            ident=ident,
        )
        while True:
            try:
                _, reply = self.session.recv(self.stdin_socket, zmq.NOBLOCK)
            except Exception:
                self.log.warning("invalid input_reply", exc_info=True)
                reply = None
            if reply is not None:
                value = reply.get("content", {}).get("value", "")
                return str(value)
            await self.cell_control.input_pause(0.01)

    # -- the other shell requests: answered from the sandbox's live namespace --------

    async def do_complete(self, code: str, cursor_pos: int | None) -> dict[str, Any]:
        pos = len(code) if cursor_pos is None else cursor_pos
        own = self.magic.complete(code, pos)
        if own is not None:
            return {"status": "ok", "metadata": {}, **own}
        try:
            reply = await self.sandbox.query("complete", code=code, cursor_pos=pos)
        except ModboxError as exc:
            self.log.warning("completion failed: %s", exc)
            reply = {}
        return {
            "status": "ok",
            "matches": reply.get("matches", []),
            "cursor_start": reply.get("cursor_start", pos),
            "cursor_end": reply.get("cursor_end", pos),
            "metadata": reply.get("metadata", {}),
        }

    async def do_inspect(
        self, code: str, cursor_pos: int, detail_level: int = 0, omit_sections: Any = ()
    ) -> dict[str, Any]:
        text = magic.help_for(code, cursor_pos)
        if text is not None:
            return {"status": "ok", "found": True, "data": {"text/plain": text}, "metadata": {}}
        try:
            reply = await self.sandbox.query(
                "inspect", code=code, cursor_pos=cursor_pos, detail_level=detail_level
            )
        except ModboxError as exc:
            self.log.warning("inspection failed: %s", exc)
            reply = {}
        return {
            "status": "ok",
            "found": bool(reply.get("found", False)),
            "data": reply.get("data", {}),
            "metadata": reply.get("metadata", {}),
        }

    async def do_is_complete(self, code: str) -> dict[str, Any]:
        try:
            reply = await self.sandbox.query("is_complete", code=code)
        except ModboxError as exc:
            self.log.warning("is_complete failed: %s", exc)
            return {"status": "unknown"}
        out: dict[str, Any] = {"status": reply.get("status", "unknown")}
        if out["status"] == "incomplete":
            out["indent"] = reply.get("indent", "")
        return out

    async def do_history(
        self,
        hist_access_type: str,
        output: bool,
        raw: bool,
        session: int | None = None,
        start: int | None = None,
        stop: int | None = None,
        n: int | None = None,
        pattern: str | None = None,
        unique: bool = False,
    ) -> dict[str, Any]:
        try:
            reply = await self.sandbox.query(
                "history",
                hist_access_type=hist_access_type,
                output=output,
                raw=raw,
                session=session,
                start=start,
                stop=stop,
                n=n,
                pattern=pattern,
                unique=unique,
            )
        except ModboxError as exc:
            self.log.warning("history failed: %s", exc)
            reply = {}
        history = [tuple(item) for item in reply.get("history", [])]
        return {"status": "ok", "history": history}


def _working_directory() -> str | None:
    """The folder Jupyter started the kernel in (the notebook's), if it still exists."""
    try:
        return os.getcwd()
    except OSError:  # removed since: nothing to copy
        return None
