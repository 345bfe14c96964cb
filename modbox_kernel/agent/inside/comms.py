"""Comms (ipywidgets' transport) between the sandbox's ``comm`` package and the kernel.

``core.Agent.setup_runner`` calls :func:`install_comms` once the runner exists; comm
messages user code sends become events of the running cell (the kernel publishes them
on IOPub). A frontend's comm message arrives as an ``execute`` carrying ``comm``
instead of code; the main thread hands it to :func:`run_comm`. ``ops`` answers
``comm_info`` with :func:`comm_info`.
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from . import protocol
from .facade import KernelFacade

if TYPE_CHECKING:
    from .cells import Cell
    from .core import Agent


def install_comms(agent: Agent) -> Any:
    """Make the ``comm`` package send through the agent; returns its manager.

    Kernels are meant to replace ``comm.create_comm`` and ``comm.get_comm_manager``
    (ipykernel does the same): a comm this process opens, sends or closes becomes a
    ``comm_open`` / ``comm_msg`` / ``comm_close`` event of the running cell or comm
    request, and the returned manager receives the frontend's comm messages
    (:func:`run_comm`). None when ``comm`` is not importable here.
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
        shell.kernel = KernelFacade(agent, shell)
    return manager


def run_comm(manager: Any, cell: Cell) -> Dict[str, Any]:
    """Handle a frontend's ``comm_open`` / ``comm_msg`` / ``comm_close`` (main thread).

    It arrives as an ``execute`` carrying ``comm`` instead of code, so it queues behind
    the running cell (as ipykernel handles it between execute requests), and what its
    handlers publish or print (a widget's echo, an ``observe`` callback's output, a
    button's long job) streams back like a cell's events. (The kernel sends no
    interrupts for it: its interrupt stops cells only.)
    """
    request = cell.comm or {}
    kind = str(request.get("msg_type"))
    if manager is not None and kind in protocol.COMM_EVENTS:
        msg = {
            "header": {"msg_type": kind},
            "content": dict(request.get("content") or {}),
            "metadata": dict(request.get("metadata") or {}),
            "buffers": [base64.b64decode(b) for b in request.get("buffers") or []],
        }
        getattr(manager, kind)(None, None, msg)
    return {"status": "ok", "user_expressions": {}, "payload": []}


def comm_info(manager: Any, target: Optional[str]) -> Dict[str, Any]:
    """The ``comm_info_reply`` content: open comms, of one target if given."""
    comms = {
        comm_id: {"target_name": c.target_name}
        for comm_id, c in list((manager.comms if manager else {}).items())
        if target is None or c.target_name == target
    }
    return {"comms": comms}
