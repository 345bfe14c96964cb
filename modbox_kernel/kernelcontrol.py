"""The control channel's requests the kernel answers itself, beside shutdown.

``ModboxKernel`` (``kernel.py``) derives from :class:`ControlRequests`; ipykernel calls
these handlers on its Control thread, where no session client may be used: each one
hops to the main loop for what it asks the sandbox. Interrupts reach the running cell
(``cellcontrol.py``), debug requests the sandbox's debugpy (``debugger.py``), usage
requests the sandbox's figures (``usage.py``); subshells are refused in one sentence.
"""

from __future__ import annotations

import asyncio
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
