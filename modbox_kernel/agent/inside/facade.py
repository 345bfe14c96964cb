"""``get_ipython().kernel`` in the sandbox: the parts of ipykernel's kernel notebooks use.

``comms.install_comms`` sets :class:`KernelFacade` as the shell's ``kernel`` once the
runner and the comm manager exist. Real notebooks reach through it: the variable
inspector from ipywidgets' documentation reads ``kernel.shell``; nbclient's own test
notebook publishes ``update_display_data`` with
``kernel.session.send(kernel.iopub_socket, …)``; ipywidgets' Output widget asks
``kernel.get_parent()`` for the request it should claim. Messages "sent" through the
facade's session become events of the running cell (or of the background log between
cells), so the kernel publishes them on IOPub as the stock kernel would have.
"""

from __future__ import annotations

import base64
import datetime
import uuid
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from . import protocol
from .wire import encode_mimebundle

if TYPE_CHECKING:
    from .core import Agent

#: Message types a cell may publish on IOPub through ``kernel.session.send``.
_PUBLISHABLE = (protocol.EV_STREAM, *protocol.OUTPUT_EVENTS, *protocol.COMM_EVENTS)


class _IOPubSocket:
    """Stands for the kernel's IOPub socket: the only stream the facade sends on."""

    def __repr__(self) -> str:
        return "<IOPub socket of the kernel (outside the sandbox)>"


class _Session:
    """``kernel.session``: ``send`` and ``msg``, as jupyter_client's Session has them."""

    def __init__(self, agent: Agent, iopub: _IOPubSocket) -> None:
        self._agent = agent
        self._iopub = iopub
        self.session = uuid.uuid4().hex
        self.username = "username"

    def msg_header(self, msg_type: str) -> Dict[str, Any]:
        return {
            "msg_id": uuid.uuid4().hex,
            "msg_type": msg_type,
            "username": self.username,
            "session": self.session,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "version": "5.3",
        }

    def msg(
        self,
        msg_type: str,
        content: Optional[Dict[str, Any]] = None,
        parent: Optional[Dict[str, Any]] = None,
        header: Optional[Dict[str, Any]] = None,
        metadata: Optional[Dict[str, Any]] = None,
    ) -> Dict[str, Any]:
        parent = parent or {}
        header = header or self.msg_header(msg_type)
        return {
            "header": header,
            "msg_id": header.get("msg_id"),
            "msg_type": msg_type,
            "parent_header": parent.get("header", parent),
            "content": dict(content or {}),
            "metadata": dict(metadata or {}),
        }

    def send(
        self,
        stream: Any,
        msg_or_type: Any,
        content: Optional[Dict[str, Any]] = None,
        parent: Optional[Dict[str, Any]] = None,
        ident: Any = None,
        buffers: Optional[List[Any]] = None,
        track: bool = False,
        header: Optional[Dict[str, Any]] = None,
        metadata: Optional[Dict[str, Any]] = None,
    ) -> Dict[str, Any]:
        """Publish one message on IOPub (the kernel sends it; the parent is its own)."""
        if isinstance(msg_or_type, dict):
            msg = dict(msg_or_type)
            msg_type = str(msg.get("msg_type") or msg.get("header", {}).get("msg_type"))
            content = msg.get("content", content)
            metadata = msg.get("metadata", metadata)
        else:
            msg_type = str(msg_or_type)
            msg = self.msg(msg_type, content, parent, header, metadata)
        if stream is not self._iopub:
            raise ValueError("inside the sandbox only the IOPub socket can be sent on")
        if msg_type not in _PUBLISHABLE:
            raise ValueError(f"a cell cannot publish {msg_type!r} messages on IOPub")
        body = dict(content or {})
        if msg_type == protocol.EV_STREAM:
            agent = self._agent
            agent.io.drain()  # after what was printed before it
            cell = agent.current if agent.current is not None else agent.background
            agent.append_stream(cell, str(body.get("name", "stdout")), str(body.get("text", "")))
            return msg
        event: Dict[str, Any] = {"type": msg_type, **body}
        if "data" in body and msg_type not in protocol.COMM_EVENTS:
            event["data"] = encode_mimebundle(dict(body["data"] or {}))
        if msg_type in protocol.COMM_EVENTS:
            event["_metadata"] = dict(metadata or {})
            event["_buffers"] = [base64.b64encode(bytes(b)).decode("ascii") for b in buffers or []]
        self._agent.emit(event)
        return msg


class KernelFacade:
    """``get_ipython().kernel``: shell, session, iopub_socket, comm_manager, parents."""

    def __init__(self, agent: Agent, shell: Any) -> None:
        self._agent = agent
        self.shell = shell
        self.iopub_socket = _IOPubSocket()
        self.session = _Session(agent, self.iopub_socket)
        self.implementation = "ipython"
        self.language_info = {"name": "python"}

    @property
    def comm_manager(self) -> Any:
        return self._agent.comm_manager

    @property
    def execution_count(self) -> int:
        return int(getattr(self.shell, "execution_count", 0))

    def get_parent(self, channel: Optional[str] = None) -> Dict[str, Any]:
        """The request being handled (ipywidgets' Output widget claims its output)."""
        cell = self._agent.current
        if cell is None or not cell.parent_header:
            return {}
        return {"header": dict(cell.parent_header)}

    @property
    def parent_header(self) -> Dict[str, Any]:
        return self.get_parent().get("header", {})
