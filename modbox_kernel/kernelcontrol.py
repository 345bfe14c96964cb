"""The control channel's requests the kernel answers itself.

``ModboxKernel`` (``kernel.py``) derives from :class:`ControlRequests`; ipykernel calls
these handlers on its Control thread, where no session client may be used: each one
hops to the main loop for what it asks the sandbox. Interrupts reach the running cell
(``cellcontrol.py``), debug requests the sandbox's debugpy (``debugger.py``), usage
requests the sandbox's figures (``usage.py``); subshells are refused in one sentence.
Shutdown destroys the sandbox and stops the loops in an order that lets the process
exit by itself; a process that ends without a shutdown request still destroys it, at
exit.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import threading
from typing import TYPE_CHECKING, Any

from ipykernel.kernelbase import Kernel

from .usage import usage_reply

if TYPE_CHECKING:
    from .cellcontrol import CellControl
    from .debugger import DebugRelay
    from .session import SandboxSession


class ControlRequests(Kernel):
    """Control-channel handlers; the attributes are set by ``ModboxKernel.__init__``."""

    sandbox: SandboxSession
    cell_control: CellControl
    debug_relay: DebugRelay
    _debug_parent: dict[str, Any]
    _shutdown_done: threading.Event

    def _watch_exit(self) -> None:
        """Called once by ``ModboxKernel.__init__``: destroy the sandbox at exit unless
        a shutdown request already did."""
        self._shutdown_done = threading.Event()
        atexit.register(self._atexit)

    # -- interrupts (docs/jupyter-traps.md, "Interrupts")

    async def interrupt_request(self, stream: Any, ident: Any, parent: Any) -> None:
        # Control thread: hop to the main loop; never SIGINT ourselves (that is what
        # the base class does, and it kills an async kernel).
        self.io_loop.add_callback(self.cell_control.interrupt)
        if self.session:
            self.session.send(stream, "interrupt_reply", {"status": "ok"}, parent, ident=ident)

    # -- the debugger and resource usage, answered from the sandbox

    async def _on_main_loop(self, coro: Any) -> Any:
        """Run ``coro`` on the main loop (where the session's clients live) from the
        control thread, and await its result there."""
        future = asyncio.run_coroutine_threadsafe(coro, self.io_loop.asyncio_loop)
        return await asyncio.wrap_future(future)

    async def debug_request(self, stream: Any, ident: Any, parent: Any) -> None:
        self._debug_parent = parent  # debugpy's events go out under the latest request
        await super().debug_request(stream, ident, parent)

    async def do_debug_request(self, msg: Any) -> dict[str, Any]:
        reply: dict[str, Any] = await self._on_main_loop(self.debug_relay.request(msg))
        return reply

    def _publish_debug_event(self, event: dict[str, Any]) -> None:
        if self.session is not None:
            self.session.send(self.iopub_socket, "debug_event", event, self._debug_parent)

    async def usage_request(self, stream: Any, ident: Any, parent: Any) -> None:
        if self.session:
            content = await self._on_main_loop(usage_reply(self.sandbox))
            self.session.send(stream, "usage_reply", content, parent, ident)

    async def create_subshell_request(self, socket: Any, ident: Any, parent: Any) -> None:
        if self.session:
            content = {
                "status": "error",
                "ename": "NotImplementedError",
                "evalue": "Modbox Python runs one cell at a time; subshells are not supported",
                "traceback": [],
            }
            self.session.send(socket, "create_subshell_reply", content, parent, ident)

    # -- shutdown (Control thread; docs/jupyter-traps.md, "Shutdown") -----------------

    async def do_shutdown(self, restart: bool) -> dict[str, Any]:
        future = asyncio.run_coroutine_threadsafe(self.sandbox.close(), self.io_loop.asyncio_loop)
        try:
            # Room for the last files to come back (filesync.FINAL_SYNC_WAIT), within
            # the 5 s jupyter_client waits before it kills the kernel.
            await asyncio.wait_for(asyncio.wrap_future(future), timeout=4.5)
        except Exception as exc:  # a stuck loop or a slow service: destroy without it
            self.log.warning("sandbox teardown on the main loop did not finish (%r)", exc)
            await asyncio.to_thread(self.sandbox.close_blocking)
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
                self.sandbox.close_blocking()
