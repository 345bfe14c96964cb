"""The agent protocol's one description, in process: the kernel's builders and the agent.

The kernel builds requests in ``modbox_kernel/protocol.py``; the agent reads them with
the names of ``modbox_kernel/agent/inside/protocol.py``. These tests hold the two to
each other without a sandbox: every field the kernel sends is one the agent reads, a
request round-trips into the agent's ``Cell`` unchanged, and every op has a handler.
"""

from __future__ import annotations

import json

import pytest

from modbox_kernel import protocol
from modbox_kernel.agent import encode_request
from modbox_kernel.agent.inside import protocol as names
from modbox_kernel.agent.inside.cells import Cell
from modbox_kernel.agent.inside.ops import Requests
from modbox_kernel.agent.inside.wire import decode_request


def test_the_execute_request_carries_exactly_the_described_fields() -> None:
    cell = protocol.CellRequest(code="1+1")
    payload = protocol.execute_request(cell, wait=0.1)
    assert payload["op"] == names.OP_EXECUTE
    described = set(names.EXECUTE_FIELDS)
    assert set(payload) - {"op"} == described - {"comm"}
    with_comm = protocol.CellRequest(code="", comm={"msg_type": "comm_msg"})
    assert set(protocol.execute_request(with_comm, wait=0)) - {"op"} == described


def test_a_kernel_built_request_reaches_the_agents_cell_unchanged() -> None:
    cell = protocol.CellRequest(
        code="print('héllo')\n`$(rm -rf /)`",
        silent=True,
        store_history=False,
        user_expressions={"a": "1+1"},
        allow_stdin=True,
        execution_count=42,
        output_limit=1234,
        parent_header={"msg_id": "m1", "msg_type": "execute_request", "session": "s"},
        comm={"msg_type": "comm_open", "content": {"comm_id": "c"}},
    )
    wire = decode_request(encode_request(protocol.execute_request(cell, wait=0.5, since=3)))
    agent_cell = Cell(wire, default_count=1)
    assert agent_cell.id == cell.cell_id
    assert agent_cell.code == cell.code
    assert (agent_cell.silent, agent_cell.store_history) == (True, False)
    assert agent_cell.user_expressions == {"a": "1+1"}
    assert agent_cell.allow_stdin is True
    assert agent_cell.execution_count == 42
    assert agent_cell.output_limit == 1234
    assert agent_cell.parent_header == cell.parent_header
    assert agent_cell.comm == cell.comm


def test_the_agent_fills_in_what_an_older_kernel_left_out() -> None:
    agent_cell = Cell({"op": "execute", "id": "x", "silent": True}, default_count=9)
    assert agent_cell.code == "" and agent_cell.store_history is False  # not silent
    assert agent_cell.execution_count == 9 and agent_cell.output_limit == 0
    assert agent_cell.comm is None and agent_cell.parent_header == {}


def test_every_op_of_the_description_has_an_agent_handler() -> None:
    ops = [v for k, v in vars(names).items() if k.startswith("OP_")]
    assert len(ops) >= 11
    missing = [op for op in ops if not callable(getattr(Requests, f"op_{op}", None))]
    assert missing == []
    handlers = {name[3:] for name in vars(Requests) if name.startswith("op_")}
    assert handlers == set(ops), "a handler the description does not name"


def test_the_other_builders_use_the_described_names() -> None:
    assert protocol.poll_request("c", since=4, wait=1.0) == {
        "op": names.OP_POLL,
        "id": "c",
        "since": 4,
        "wait": 1.0,
    }
    assert set(protocol.poll_request("c", since=0, wait=0)) - {"op"} == set(names.POLL_FIELDS)
    assert protocol.interrupt_request("c") == {"op": "interrupt", "id": "c"}
    assert protocol.input_reply("c", "v") == {"op": "input_reply", "id": "c", "value": "v"}
    assert protocol.query("complete", code="x", cursor_pos=1)["op"] == "complete"
    assert protocol.shutdown_request() == {"op": "shutdown"}
    with pytest.raises(ValueError, match="not a query op"):
        protocol.query("execute")


def test_requests_survive_the_wire_encoding() -> None:
    payload = protocol.execute_request(protocol.CellRequest(code="\x00\n'\"\\ 🐍"), wait=0)
    encoded = encode_request(payload)
    assert set(encoded) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")
    assert decode_request(encoded) == json.loads(json.dumps(payload))


def test_the_output_cap_notice_is_one_text_on_both_sides() -> None:
    assert protocol.truncation_notice is names.truncation_notice
    text = protocol.truncation_notice(2048)
    assert "2048 bytes" in text and "MODBOX_OUTPUT_LIMIT" in text
