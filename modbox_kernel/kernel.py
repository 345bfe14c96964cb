"""ModboxKernel: the Jupyter protocol on one side, a :class:`SandboxSession` on the other.

ipykernel's ``IPKernelApp`` instantiates this class (see ``kernelapp.py``) and calls the
``do_*`` handlers on the main thread, one at a time; ``interrupt_request`` and
``do_shutdown`` arrive on the Control thread. Nothing here knows about HTTP: the session
does. What this module adds is Jupyter behaviour:

* every ``do_execute`` returns a reply and publishes an ``error`` output on failure
  (an escaping exception would leave clients waiting forever);
* agent events are relayed to IOPub as Jupyter messages, stream text coalesced;
* interrupts never kill the kernel (the naive async wrapper dies, see
  ``jupyter-notes.md`` §0): SIGINT and ``interrupt_request`` both become a request to the
  agent to raise ``KeyboardInterrupt`` in the user's code;
* the first cell waits for the sandbox and shows progress while it does.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import contextlib
import os
import platform
import signal
import threading
import time
from typing import Any

import zmq
from ipykernel.kernelbase import Kernel
from traitlets import Bool, Dict, Float, Int, Unicode, default

from . import __version__
from .errors import ModboxError, SandboxLostError
from .session import CellRequest, SandboxSession, SessionConfig

# Show provisioning progress in the first cell only if it takes longer than this.
PROGRESS_AFTER = 1.0
# Relay stream text to IOPub at most this often while a cell runs (so a print flood
# becomes at most ~50 messages/s, far under jupyter_server's 1000 msg/s limit).
STREAM_FLUSH_INTERVAL = 0.02
STREAM_FLUSH_BYTES = 64 * 1024
# After an interrupt (or a time limit), how long the cell may take to stop before the
# kernel restarts the sandbox's Python process. A second interrupt escalates at once.
INTERRUPT_GRACE = 3.0
# A first line of this form sets a time limit for one cell (seconds).
TIMEOUT_MAGIC = "%%modbox_timeout"
# Comm messages (ipywidgets) in both directions, relayed as they are.
COMM_MSG_TYPES = ("comm_open", "comm_msg", "comm_close")


def _env(name: str, fallback: str = "") -> str:
    return os.environ.get(name, fallback)


class ModboxKernel(Kernel):
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

    # -- configuration (design.md §4): traits, defaults from the environment -------

    api_url = Unicode(help="Modbox API base URL (env MODBOX_API_URL).").tag(config=True)
    api_token = Unicode(
        help="Modbox API token (env MODBOX_API_TOKEN). Unset: use the embedded local service."
    ).tag(config=True)
    backend = Unicode(
        help="auto | local | remote (env MODBOX_BACKEND). auto = remote if a token is set."
    ).tag(config=True)
    image_id = Unicode(help="Sandbox image id (env MODBOX_IMAGE_ID).").tag(config=True)
    image = Unicode(help="Raw sandbox image reference (env MODBOX_IMAGE).").tag(config=True)
    ttl_seconds = Int(help="Sandbox TTL in seconds, 60-86400 (env MODBOX_TTL_SECONDS).").tag(
        config=True
    )
    workspace_id = Unicode(help="Modbox workspace id (env MODBOX_WORKSPACE_ID).").tag(config=True)
    sandbox_env = Dict(
        value_trait=Unicode(), help="Extra environment variables for the sandbox."
    ).tag(config=True)
    startup_timeout = Float(
        help="Seconds to wait for a sandbox to be ready (env MODBOX_STARTUP_TIMEOUT)."
    ).tag(config=True)
    cell_timeout = Float(
        help="Time limit per cell in seconds, 0 = none (env MODBOX_CELL_TIMEOUT). A cell can "
        "set its own with a first line '%%modbox_timeout SECONDS'. At the limit the cell is "
        "interrupted, and if it does not stop, its Python process is restarted."
    ).tag(config=True)
    output_limit = Int(
        help="Maximum stream output per cell in bytes, 0 = unlimited (env MODBOX_OUTPUT_LIMIT). "
        "Beyond it output is dropped with one notice."
    ).tag(config=True)
    copy_workdir = Bool(
        help="Copy the kernel's working directory (the notebook's folder) into each new "
        "sandbox, so relative paths such as 'data.csv' work as with a local kernel; hidden "
        "files are left out (env MODBOX_COPY_WORKDIR, 1 or 0)."
    ).tag(config=True)
    copy_limit = Int(
        help="Copy the notebook's folder only if its files total at most this many bytes "
        "(env MODBOX_COPY_LIMIT)."
    ).tag(config=True)

    @default("api_url")
    def _default_api_url(self) -> str:
        return _env("MODBOX_API_URL", "https://api.modbox.run")

    @default("api_token")
    def _default_api_token(self) -> str:
        return _env("MODBOX_API_TOKEN")

    @default("backend")
    def _default_backend(self) -> str:
        return _env("MODBOX_BACKEND", "auto")

    @default("image_id")
    def _default_image_id(self) -> str:
        return _env("MODBOX_IMAGE_ID")

    @default("image")
    def _default_image(self) -> str:
        return _env("MODBOX_IMAGE")

    @default("ttl_seconds")
    def _default_ttl(self) -> int:
        return int(_env("MODBOX_TTL_SECONDS", "3600") or 3600)

    @default("workspace_id")
    def _default_workspace(self) -> str:
        return _env("MODBOX_WORKSPACE_ID")

    @default("cell_timeout")
    def _default_cell_timeout(self) -> float:
        return float(_env("MODBOX_CELL_TIMEOUT", "0") or 0)

    @default("output_limit")
    def _default_output_limit(self) -> int:
        return int(_env("MODBOX_OUTPUT_LIMIT", str(10 * 1024 * 1024)) or 0)

    @default("copy_workdir")
    def _default_copy_workdir(self) -> bool:
        return _env("MODBOX_COPY_WORKDIR", "1").strip().lower() not in ("0", "false", "no", "off")

    @default("copy_limit")
    def _default_copy_limit(self) -> int:
        return int(_env("MODBOX_COPY_LIMIT", str(32 * 1024 * 1024)) or 0)

    @default("startup_timeout")
    def _default_startup_timeout(self) -> float:
        return float(_env("MODBOX_STARTUP_TIMEOUT", "120") or 120)

    # -- lifecycle ------------------------------------------------------------------

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.modbox = SandboxSession(
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
                copy_folder=_working_directory() if self.copy_workdir else None,
                copy_limit=max(0, self.copy_limit),
            )
        )
        self._cell_task: asyncio.Task[Any] | None = None
        self._cell_waiting_for_sandbox = False
        self._input_wait: asyncio.Future[str] | None = None
        self._interrupts = 0
        self._escalated = False
        self._escalation: asyncio.TimerHandle | None = None
        self._timed_out: float | None = None
        self._tasks: set[asyncio.Future[Any]] = set()
        self._shutdown_done = threading.Event()
        atexit.register(self._atexit)
        for msg_type in COMM_MSG_TYPES:
            self.shell_handlers[msg_type] = self._comm_message

    def start(self) -> None:
        super().start()
        # Provisioning starts now, in the background, so kernel_info is answered at
        # once and the first cell usually finds the sandbox ready (design.md rule 7).
        self.io_loop.add_callback(self.modbox.start)

    @property
    def kernel_info(self) -> dict[str, Any]:
        info = super().kernel_info
        # We have neither subshells nor a debugger: don't let clients believe we do.
        info["supported_features"] = []
        version = self.modbox.agent_info.get("python_version")
        if version:
            info["language_info"] = {**self.language_info, "version": version}
        return info

    # -- comms (ipywidgets): the frontend's side ------------------------------------

    async def _comm_message(self, stream: Any, ident: Any, parent: dict[str, Any]) -> None:
        """A frontend's comm_open / comm_msg / comm_close: on to the sandbox's comms.

        It travels like a cell (the agent runs the comm handlers instead of code), so
        what they publish or print streams to IOPub with this message as parent, as
        under ipykernel. Without a sandbox the comms it names are gone: nothing to do.
        """
        if not self.modbox.ready:
            return
        request = CellRequest(
            code="",
            store_history=False,
            execution_count=self.execution_count,
            output_limit=max(0, self.output_limit),
            parent_header=_header_of(parent),
            comm={
                "msg_type": parent["header"]["msg_type"],
                "content": dict(parent.get("content") or {}),
                "metadata": dict(parent.get("metadata") or {}),
                "buffers": [
                    base64.b64encode(bytes(b)).decode("ascii") for b in parent.get("buffers") or []
                ],
            },
        )
        relay = _Relay(self, silent=False, output_limit=max(0, self.output_limit))
        try:
            await self.modbox.execute(request, relay.event)
        except Exception as exc:  # a lost sandbox is reported by the next cell
            self.log.warning("a comm message could not reach the sandbox: %s", exc)
        relay.flush()

    async def comm_info_request(self, stream: Any, ident: Any, parent: Any) -> None:
        comms: dict[str, Any] = {}
        if self.modbox.ready:
            target = (parent.get("content") or {}).get("target_name")
            try:
                reply = await self.modbox.query("comm_info", target_name=target)
                comms = dict(reply.get("comms") or {})
            except ModboxError as exc:
                self.log.warning("comm_info failed: %s", exc)
        if self.session:
            content = {"status": "ok", "comms": comms}
            self.session.send(stream, "comm_info_reply", content, parent, ident)

    async def create_subshell_request(self, socket: Any, ident: Any, parent: Any) -> None:
        if self.session:
            content = {
                "status": "error",
                "ename": "NotImplementedError",
                "evalue": "Modbox Python runs one cell at a time; subshells are not supported",
                "traceback": [],
            }
            self.session.send(socket, "create_subshell_reply", content, parent, ident)

    # -- interrupts (jupyter-notes.md §1.6) -----------------------------------------

    def pre_handler_hook(self) -> None:
        loop = asyncio.get_event_loop()

        def on_sigint(signum: int, frame: Any) -> None:
            # call_soon_threadsafe wakes the selector; plain call_soon would not.
            loop.call_soon_threadsafe(self._on_interrupt)

        self.saved_sigint_handler = signal.signal(signal.SIGINT, on_sigint)

    async def interrupt_request(self, stream: Any, ident: Any, parent: Any) -> None:
        # Control thread: hop to the main loop; never SIGINT ourselves (that is what
        # the base class does, and it kills an async kernel).
        self.io_loop.add_callback(self._on_interrupt)
        if self.session:
            self.session.send(stream, "interrupt_reply", {"status": "ok"}, parent, ident=ident)

    def _on_interrupt(self) -> None:
        """Stop the running cell: ask the agent first, escalate if that does not work."""
        task = self._cell_task
        if task is None or task.done():
            return
        if self._cell_waiting_for_sandbox:
            task.cancel()  # nothing runs remotely yet: just stop waiting
            return
        if self._input_wait is not None and not self._input_wait.done():
            self._input_wait.cancel()  # the frontend's prompt is moot now
        self._interrupts += 1
        if self._interrupts >= 2:
            self._escalate()
            return
        self._background(self.modbox.interrupt())
        loop = asyncio.get_event_loop()
        self._escalation = loop.call_later(INTERRUPT_GRACE, self._escalate)

    def _background(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)  # keep a reference until done (asyncio holds weak ones)
        task.add_done_callback(self._tasks.discard)

    def _escalate(self) -> None:
        """The cell ignored KeyboardInterrupt: end it and restart the sandbox's Python."""
        task = self._cell_task
        if task is None or task.done() or self._escalated:
            return
        self._escalated = True
        task.cancel()

    def _on_time_limit(self, limit: float) -> None:
        self._timed_out = limit
        self._on_interrupt()

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
        code, limit = self._cell_time_limit(code)
        cell = CellRequest(
            code=code,
            silent=silent,
            store_history=store_history,
            user_expressions=dict(user_expressions or {}),
            allow_stdin=allow_stdin,
            execution_count=self.execution_count,
            output_limit=max(0, self.output_limit),
            parent_header=_header_of(self.get_parent("shell")),
        )
        relay = _Relay(self, silent, output_limit=max(0, self.output_limit))
        self._interrupts = 0
        self._escalated = False
        self._timed_out = None
        task = asyncio.ensure_future(self._run_cell(cell, relay))
        self._cell_task = task
        loop = asyncio.get_event_loop()
        timer = loop.call_later(limit, self._on_time_limit, limit) if limit > 0 else None
        try:
            reply = await task
            if self._timed_out is not None and reply.get("ename") == "KeyboardInterrupt":
                reply = self.time_limit_error(reply)
            return reply
        except asyncio.CancelledError:
            relay.flush()
            if self._escalated:
                return await self._escalated_reply(relay)
            text = "interrupted while waiting for the sandbox"
            error: dict[str, Any] = {
                "ename": "KeyboardInterrupt",
                "evalue": text,
                "traceback": [_red(f"KeyboardInterrupt: {text}")],
            }
            if self._timed_out is not None:
                error = self.time_limit_error(error)
            return self._error_reply(relay, error["ename"], error["evalue"], error["traceback"])
        except Exception as exc:  # never let an exception escape: no reply = hung client
            relay.flush()
            self.log.exception("cell failed in the kernel")
            return self._error_reply(relay, type(exc).__name__, str(exc), [f"{exc}"])
        finally:
            if timer is not None:
                timer.cancel()
            if self._escalation is not None:
                self._escalation.cancel()
                self._escalation = None
            self._cell_task = None
            self._cell_waiting_for_sandbox = False

    def _cell_time_limit(self, code: str) -> tuple[str, float]:
        """Strip a leading ``%%modbox_timeout N`` line; return (code, limit seconds)."""
        limit = float(self.cell_timeout or 0)
        first, sep, rest = code.partition("\n")
        if first.strip().startswith(TIMEOUT_MAGIC):
            arg = first.strip()[len(TIMEOUT_MAGIC) :].strip()
            try:
                limit = float(arg)
            except ValueError:
                self.log.warning("ignoring %s with a non-numeric argument", TIMEOUT_MAGIC)
            # Keep the line count so tracebacks point at the right line numbers.
            code = "\n" + rest if sep else ""
        return code, limit

    def _limit_sentence(self) -> str:
        return (
            f"the cell exceeded its time limit of {self._timed_out:g} s "
            f"(set by ModboxKernel.cell_timeout / MODBOX_CELL_TIMEOUT, or {TIMEOUT_MAGIC} "
            "on the cell's first line)"
        )

    def time_limit_error(self, error: dict[str, Any]) -> dict[str, Any]:
        """``error`` (the agent's KeyboardInterrupt) as the time-limit error it really is.

        Called by the relay for the published error output and by ``do_execute`` for the
        reply, so that both name the same exception: nbclient reports the reply,
        papermill and the saved notebook show the output. The traceback is kept (it
        shows where the cell was), with the reason as its last line.
        """
        text = f"Modbox: {self._limit_sentence()}."
        traceback = [*error.get("traceback", []), _red(f"CellTimeoutError: {text}")]
        return {**error, "ename": "CellTimeoutError", "evalue": text, "traceback": traceback}

    @property
    def timed_out(self) -> bool:
        """Whether the running cell hit its time limit (its interrupt is the limit's)."""
        return self._timed_out is not None

    async def _escalated_reply(self, relay: _Relay) -> dict[str, Any]:
        try:
            await asyncio.wait_for(self.modbox.restart_agent(), timeout=30)
        except Exception as exc:
            self.log.warning("could not restart the sandbox agent: %s", exc)
        why = (
            self._limit_sentence()
            if self._timed_out is not None
            else "the cell did not stop after an interrupt"
        )
        text = (
            f"{why}; the Python process in the sandbox was restarted, so all variables "
            "and imports were lost (files in the sandbox were kept)"
        )
        ename = "CellTimeoutError" if self._timed_out is not None else "KeyboardInterrupt"
        return self._error_reply(relay, ename, text, [_red(f"{ename}: {text}")])

    async def _run_cell(self, cell: CellRequest, relay: _Relay) -> dict[str, Any]:
        try:
            await self._wait_for_sandbox(relay)
        except ModboxError as exc:
            return self._error_reply(relay, "SandboxUnavailable", str(exc), [_red(str(exc))])
        warning = self.modbox.expiry_warning()
        if warning:
            relay.stream("stderr", warning + "\n")
        if self.modbox.copy_notice:
            relay.stream("stderr", f"Modbox: {self.modbox.copy_notice}.\n")
            self.modbox.copy_notice = None
        if self.modbox.lost_notice:
            notice = self.modbox.lost_notice
            self.modbox.lost_notice = None
            relay.stream(
                "stderr",
                f"Modbox: {notice}; this cell runs in a fresh sandbox, "
                "so earlier variables and files are gone.\n",
            )
        try:
            done = await self.modbox.execute(cell, relay.event)
        except SandboxLostError as exc:
            relay.flush()
            text = (
                f"{exc}. Variables and files of this session are lost; "
                "the next cell starts a fresh sandbox."
            )
            return self._error_reply(relay, "SandboxLost", text, [_red(text)])
        except ModboxError as exc:
            relay.flush()
            return self._error_reply(relay, "ModboxError", str(exc), [_red(str(exc))])
        relay.flush()
        return self._reply_from_done(done)

    async def _wait_for_sandbox(self, relay: _Relay) -> None:
        if self.modbox.ready:
            return
        self._cell_waiting_for_sandbox = True
        ready = asyncio.ensure_future(self.modbox.ensure_ready())
        t0 = time.monotonic()
        shown = False
        try:
            while True:
                done, _ = await asyncio.wait({ready}, timeout=PROGRESS_AFTER if not shown else 1.0)
                if done:
                    break
                text = f"Starting a Modbox sandbox… {time.monotonic() - t0:.0f} s"
                relay.progress(text, update=shown)
                shown = True
        except asyncio.CancelledError:
            ready.cancel()
            if shown:
                relay.clear_progress()
            raise
        finally:
            self._cell_waiting_for_sandbox = False
        if shown:
            relay.clear_progress()
        ready.result()  # raises the provisioning error, if any

    def _reply_from_done(self, done: dict[str, Any]) -> dict[str, Any]:
        status = done.get("status", "ok")
        reply: dict[str, Any] = {"status": status, "execution_count": self.execution_count}
        if status == "error":
            reply.update(
                ename=done.get("ename", "Error"),
                evalue=done.get("evalue", ""),
                traceback=done.get("traceback", []),
            )
        else:
            reply.update(
                payload=done.get("payload", []),
                user_expressions=done.get("user_expressions", {}),
            )
        return reply

    def _error_reply(
        self, relay: _Relay, ename: str, evalue: str, traceback: list[str]
    ) -> dict[str, Any]:
        # Publish the error as output too: papermill and nbclient look for it there.
        relay.publish("error", {"ename": ename, "evalue": evalue, "traceback": traceback})
        return {
            "status": "error",
            "execution_count": self.execution_count,
            "ename": ename,
            "evalue": evalue,
            "traceback": traceback,
        }

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
            # A future per wait, so an interrupt can end it (see _on_interrupt).
            waiter: asyncio.Future[str] = asyncio.get_event_loop().create_future()
            self._input_wait = waiter
            await asyncio.wait({waiter}, timeout=0.01)
            self._input_wait = None
            if waiter.cancelled():
                raise _InputCancelled()

    # -- the other shell requests: answered from the sandbox's live namespace --------

    async def do_complete(self, code: str, cursor_pos: int | None) -> dict[str, Any]:
        pos = len(code) if cursor_pos is None else cursor_pos
        try:
            reply = await self.modbox.query("complete", code=code, cursor_pos=pos)
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
        try:
            reply = await self.modbox.query(
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
            reply = await self.modbox.query("is_complete", code=code)
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
            reply = await self.modbox.query(
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

    # -- shutdown (Control thread; jupyter-notes.md §1.7) -----------------------------

    async def do_shutdown(self, restart: bool) -> dict[str, Any]:
        future = asyncio.run_coroutine_threadsafe(self.modbox.close(), self.io_loop.asyncio_loop)
        try:
            await asyncio.wait_for(asyncio.wrap_future(future), timeout=2.0)
        except Exception as exc:  # a stuck loop or a slow service: destroy without it
            self.log.warning("sandbox teardown on the main loop did not finish (%r)", exc)
            await asyncio.to_thread(self.modbox.close_blocking)
        self._shutdown_done.set()
        return {"status": "ok", "restart": restart}

    async def shutdown_request(self, stream: Any, ident: Any, parent: Any) -> None:
        """ipykernel's shutdown_request, except that the main loop stops last.

        Right after a control handler returns, ipykernel flushes sys.stdout/stderr
        through the IOPub thread. The base class has already asked the main loop to
        stop by then, so the main thread may be inside IPKernelApp.close() tearing the
        IOPub thread down: the flush blocks, the process never exits by itself, and
        jupyter_client SIGTERMs it after 2.5 s (every restart pays that).
        """
        if not self.session:
            return
        content = await self.do_shutdown(parent["content"]["restart"])
        self.session.send(stream, "shutdown_reply", content, parent, ident=ident)
        self._shutdown_message = self.session.msg("shutdown_reply", content, parent)  # type: ignore[assignment]
        await self._at_shutdown()
        main = self.io_loop
        loops = [main]
        if self.shell_stream and self.shell_stream.io_loop is not main:
            loops.append(self.shell_stream.io_loop)
        if self.control_stream:
            control = self.control_stream.io_loop
            control.add_callback(control.stop)
            # A control-loop callback runs only after process_control (and its flushes)
            # has finished with this message.
            for loop in loops:
                control.add_callback(loop.add_callback, loop.stop)
        else:
            for loop in loops:
                loop.add_callback(loop.stop)

    def _atexit(self) -> None:
        if not self._shutdown_done.is_set():
            with contextlib.suppress(Exception):
                self.modbox.close_blocking()


class _Relay:
    """Turns agent events into IOPub messages for one cell, coalescing stream text."""

    def __init__(self, kernel: ModboxKernel, silent: bool, *, output_limit: int = 0) -> None:
        self.kernel = kernel
        self.silent = silent
        # A second guard behind the agent's own per-cell cap (the agent cuts at the
        # limit and adds the notice; the slack keeps that notice from being cut again
        # here): an agent that ignores the limit still cannot grow kernel memory.
        self._configured_limit = output_limit
        self._limit = output_limit + 64 * 1024 if output_limit else 0
        self._streamed = 0
        self._truncated = False
        # Pending stream text as runs of one stream name, in arrival order, so
        # interleaved stdout/stderr keep their order when flushed.
        self._runs: list[list[str]] = []
        self._pending = 0
        self._last_flush = time.monotonic()
        self._timer: asyncio.TimerHandle | None = None
        self._progress_id = f"modbox-progress-{os.getpid()}-{id(self)}"

    def publish(self, msg_type: str, content: dict[str, Any]) -> None:
        if self.silent and msg_type != "error":
            return
        self.kernel.send_response(self.kernel.iopub_socket, msg_type, content)

    def stream(self, name: str, text: str) -> None:
        if not text:
            return
        if self._limit:
            if self._truncated:
                return
            room = self._limit - self._streamed
            if len(text) > room:
                text = text[: max(0, room)] + self.truncation_notice()
                self._truncated = True
            self._streamed += len(text)
        if self._runs and self._runs[-1][0] == name:
            self._runs[-1].append(text)
        else:
            self._runs.append([name, text])
        self._pending += len(text)
        since = time.monotonic() - self._last_flush
        if self._pending >= STREAM_FLUSH_BYTES or since >= STREAM_FLUSH_INTERVAL:
            self.flush()
        elif self._timer is None:
            # Bound the delay: whatever is buffered goes out at the end of the current
            # interval even if no further event arrives for a while.
            loop = asyncio.get_event_loop()
            self._timer = loop.call_later(STREAM_FLUSH_INTERVAL - since, self.flush)

    def truncation_notice(self) -> str:
        return (
            f"\n[Modbox: output of this cell truncated after {self._configured_limit} bytes; "
            "set ModboxKernel.output_limit / MODBOX_OUTPUT_LIMIT to change the limit]\n"
        )

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        runs, self._runs = self._runs, []
        for name, *texts in runs:
            self.publish("stream", {"name": name, "text": "".join(texts)})
        self._pending = 0
        self._last_flush = time.monotonic()

    async def event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "stream":
            self.stream(str(event.get("name", "stdout")), str(event.get("text", "")))
            return
        self.flush()
        if kind == "input_request":
            await self._answer_input(event)
            return
        content = {k: v for k, v in event.items() if k not in ("type", "seq")}
        if (
            kind == "error"
            and self.kernel.timed_out
            and content.get("ename") == "KeyboardInterrupt"
        ):
            content = self.kernel.time_limit_error(content)
        if kind == "execute_result":
            content["execution_count"] = self.kernel.execution_count
        if kind in ("display_data", "update_display_data", "execute_result"):
            content.setdefault("metadata", {})
            content.setdefault("data", {})
            if kind != "execute_result":
                content.setdefault("transient", {})
        if kind in COMM_MSG_TYPES:
            # Published even for silent requests (ipykernel does too): widget state.
            metadata = content.pop("_metadata", {})
            buffers = [base64.b64decode(b) for b in content.pop("_buffers", [])]
            self.kernel.send_response(
                self.kernel.iopub_socket, str(kind), content, metadata=metadata, buffers=buffers
            )
            return
        if kind in (
            "display_data",
            "update_display_data",
            "execute_result",
            "error",
            "clear_output",
        ):
            self.publish(str(kind), content)

    async def _answer_input(self, event: dict[str, Any]) -> None:
        cell = self.kernel.modbox.running_cell
        try:
            value = await self.kernel.ask_frontend(
                str(event.get("prompt", "")), bool(event.get("password", False))
            )
        except _InputCancelled:
            return  # interrupted: the agent raises KeyboardInterrupt in input()
        except Exception:
            value = "\x04"  # the agent turns this into EOFError, as ipykernel does
        if cell is not None:
            await self.kernel.modbox.send_input(cell, value)

    def progress(self, text: str, *, update: bool) -> None:
        content = {
            "data": {"text/plain": text},
            "metadata": {},
            "transient": {"display_id": self._progress_id},
        }
        self.publish("update_display_data" if update else "display_data", content)

    def clear_progress(self) -> None:
        # The cell has no output of its own yet, so clearing removes only the progress
        # line and nothing stale is left in a saved notebook.
        self.publish("clear_output", {"wait": False})


class _InputCancelled(Exception):
    """An interrupt arrived while the frontend was being asked for input."""


def _header_of(message: Any) -> dict[str, Any]:
    """The parts of a request's header the sandbox may see (no signature, no date)."""
    header = message.get("header", {}) if isinstance(message, dict) else {}
    return {k: str(header[k]) for k in ("msg_id", "msg_type", "session") if k in header}


def _working_directory() -> str | None:
    """The folder Jupyter started the kernel in (the notebook's), if it still exists."""
    try:
        return os.getcwd()
    except OSError:  # removed since: nothing to copy
        return None


def _red(text: str) -> str:
    return f"\x1b[0;31m{text}\x1b[0m"
