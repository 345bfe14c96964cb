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
import contextlib
import os
import platform
import signal
import threading
import time
from typing import Any

import zmq
from ipykernel.kernelbase import Kernel
from traitlets import Dict, Float, Int, Unicode, default

from . import __version__
from .errors import ModboxError, SandboxLostError
from .session import CellRequest, SandboxSession, SessionConfig

# Show provisioning progress in the first cell only if it takes longer than this.
PROGRESS_AFTER = 1.0
# Relay stream text to IOPub at most this often per stream while a cell runs.
STREAM_FLUSH_INTERVAL = 0.05
STREAM_FLUSH_BYTES = 64 * 1024


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
            )
        )
        self._cell_task: asyncio.Task[Any] | None = None
        self._cell_waiting_for_sandbox = False
        self._shutdown_done = threading.Event()
        atexit.register(self._atexit)

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
        task = self._cell_task
        if task is None or task.done():
            return
        if self._cell_waiting_for_sandbox:
            task.cancel()  # nothing runs remotely yet: just stop waiting
            return
        asyncio.ensure_future(self.modbox.interrupt())

    # -- execute --------------------------------------------------------------------

    async def do_execute(  # type: ignore[override]
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
        cell = CellRequest(
            code=code,
            silent=silent,
            store_history=store_history,
            user_expressions=dict(user_expressions or {}),
            allow_stdin=allow_stdin,
            execution_count=self.execution_count,
        )
        relay = _Relay(self, silent)
        task = asyncio.ensure_future(self._run_cell(cell, relay))
        self._cell_task = task
        try:
            return await task
        except asyncio.CancelledError:
            relay.flush()
            return self._error_reply(
                relay,
                "KeyboardInterrupt",
                "interrupted while waiting for the sandbox",
                ["KeyboardInterrupt: interrupted while waiting for the sandbox"],
            )
        except Exception as exc:  # never let an exception escape: no reply = hung client
            relay.flush()
            self.log.exception("cell failed in the kernel")
            return self._error_reply(relay, type(exc).__name__, str(exc), [f"{exc}"])
        finally:
            self._cell_task = None
            self._cell_waiting_for_sandbox = False

    async def _run_cell(self, cell: CellRequest, relay: _Relay) -> dict[str, Any]:
        try:
            await self._wait_for_sandbox(relay)
        except ModboxError as exc:
            return self._error_reply(relay, "SandboxUnavailable", str(exc), [_red(str(exc))])
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
            text = f"{exc}. Variables and files of this session are lost; the next cell starts a fresh sandbox."
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
            await asyncio.sleep(0.01)

    # -- the other shell requests: answered from the sandbox's live namespace --------

    async def do_complete(self, code: str, cursor_pos: int | None) -> dict[str, Any]:  # type: ignore[override]
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

    async def do_inspect(  # type: ignore[override]
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

    async def do_is_complete(self, code: str) -> dict[str, Any]:  # type: ignore[override]
        try:
            reply = await self.modbox.query("is_complete", code=code)
        except ModboxError as exc:
            self.log.warning("is_complete failed: %s", exc)
            return {"status": "unknown"}
        out: dict[str, Any] = {"status": reply.get("status", "unknown")}
        if out["status"] == "incomplete":
            out["indent"] = reply.get("indent", "")
        return out

    async def do_history(  # type: ignore[override]
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

    def _atexit(self) -> None:
        if not self._shutdown_done.is_set():
            with contextlib.suppress(Exception):
                self.modbox.close_blocking()


class _Relay:
    """Turns agent events into IOPub messages for one cell, coalescing stream text."""

    def __init__(self, kernel: ModboxKernel, silent: bool) -> None:
        self.kernel = kernel
        self.silent = silent
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
        if self._runs and self._runs[-1][0] == name:
            self._runs[-1].append(text)
        else:
            self._runs.append([name, text])
        self._pending += len(text)
        if (
            self._pending >= STREAM_FLUSH_BYTES
            or time.monotonic() - self._last_flush >= STREAM_FLUSH_INTERVAL
        ):
            self.flush()
        elif self._timer is None:
            # Bound the delay: whatever is buffered goes out within one interval even
            # if no further event arrives for a while.
            loop = asyncio.get_event_loop()
            self._timer = loop.call_later(STREAM_FLUSH_INTERVAL, self.flush)

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
        if kind == "execute_result":
            content["execution_count"] = self.kernel.execution_count
        if kind in ("display_data", "update_display_data", "execute_result"):
            content.setdefault("metadata", {})
            content.setdefault("data", {})
            if kind != "execute_result":
                content.setdefault("transient", {})
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


def _red(text: str) -> str:
    return f"\x1b[0;31m{text}\x1b[0m"
