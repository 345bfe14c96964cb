"""The agent channel's event cursor, in process, through the runtime client's transport seam.

``httpx.MockTransport`` plays the sandbox's runtime API (the exec call) and, behind it,
an agent that numbers its events: the fault shapes here (a 503 between polls, a retried
request whose answer repeats events already relayed, an agent that died mid-cell) are
ones a real service cannot be made to produce on demand. The real agent's cursor is
tested against a real daemon in ``test_agent.py``; this is the kernel's side of it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from modbox_kernel import protocol
from modbox_kernel.agent import UNREACHABLE_EXIT
from modbox_kernel.api import SandboxInfo, SandboxRuntime
from modbox_kernel.channel import AgentChannel, AgentUnreachable

BODY = re.compile(r'"\$T" ([A-Za-z0-9+/=]+) >&3')


class FakeAgent:
    """Answers exec'd agent requests from a script of events; records every request."""

    def __init__(self, events: list[dict[str, Any]]) -> None:
        self.events = [{"seq": i, **e} for i, e in enumerate(events)]
        self.requests: list[dict[str, Any]] = []
        # Called with each request; may return a Response to send instead (a fault).
        self.fault: Callable[[dict[str, Any]], httpx.Response | None] = lambda req: None
        self.per_answer = 2  # events per answer, so a cell takes several polls
        self.answered: dict[Any, int] = {}  # rid -> the next it was answered with

    def __call__(self, request: httpx.Request) -> httpx.Response:
        command = json.loads(request.content)["command"]
        match = BODY.search(command)
        assert match, command
        req = json.loads(base64.b64decode(match.group(1)))
        self.requests.append(req)
        faulty = self.fault(req)
        if faulty is not None:
            return faulty
        since = int(req.get("since") or 0)
        # Pipelined polls: one that names an answered predecessor goes on from its end.
        since = max(since, self.answered.get(req.get("after"), since))
        out = self.events[since : since + self.per_answer]
        nxt = since + len(out)
        if req.get("rid"):
            self.answered[req["rid"]] = nxt
        done = any(e["type"] == "done" for e in out)
        answer = {"ok": True, "events": out, "next": nxt, "done": done}
        return exec_answer(json.dumps(answer) + "\n")


def exec_answer(stdout: str, exit_code: int = 0, stderr: str = "") -> httpx.Response:
    body = {"exitCode": exit_code, "stdout": stdout, "stderr": stderr, "durationMs": 1}
    return httpx.Response(200, json=body)


def channel_for(agent: FakeAgent) -> AgentChannel:
    info = SandboxInfo(id="sb-1", sandbox_url="https://sb-1.sandbox.test", access_token="t")
    runtime = SandboxRuntime(info, None, transport=httpx.MockTransport(agent))
    return AgentChannel(runtime, "/sandbox-home/.modbox", upload_dir=None)


async def run(channel: AgentChannel, cell: protocol.CellRequest) -> tuple[list[Any], Any]:
    relayed: list[dict[str, Any]] = []

    async def on_event(event: dict[str, Any]) -> None:
        relayed.append(event)

    async def guard(request: Any) -> Any:
        return await request

    done = await channel.run_cell(cell, on_event, guard)
    # The poll that was out when the cell ended is answered and dropped: let it be.
    await asyncio.sleep(0.05)
    return relayed, done


SCRIPT = [
    {"type": "stream", "name": "stdout", "text": "a"},
    {"type": "display_data", "data": {"text/plain": "d"}},
    {"type": "stream", "name": "stdout", "text": "b"},
    {"type": "stream", "name": "stderr", "text": "c"},
    {"type": "execute_result", "data": {"text/plain": "1"}},
    {"type": "done", "status": "ok"},
]


async def test_every_event_is_relayed_once_in_order_and_done_is_returned() -> None:
    agent = FakeAgent(SCRIPT)
    cell = protocol.CellRequest(code="x")
    relayed, done = await run(channel_for(agent), cell)
    assert [e["seq"] for e in relayed] == [0, 1, 2, 3, 4]
    assert done["type"] == "done" and done["seq"] == 5
    # One submit, then pipelined polls: each names the one before it, and its since is
    # what this side held when it was sent.
    assert agent.requests[0]["op"] == "execute" and agent.requests[0]["id"] == cell.cell_id
    polls = agent.requests[1:]
    assert [p["op"] for p in polls] == ["poll", "poll", "poll"]
    assert all(p["id"] == cell.cell_id for p in polls)
    assert [p["since"] for p in polls] == [2, 2, 4]
    assert "after" not in polls[0]
    assert [p["after"] for p in polls[1:]] == [polls[0]["rid"], polls[1]["rid"]]
    # The last one was out when the cell ended; the agent answers it, nobody reads it.
    assert [agent.answered[p["rid"]] for p in polls] == [4, 6, 6]


async def test_a_transport_fault_is_retried_and_repeated_events_are_skipped() -> None:
    agent = FakeAgent(SCRIPT)
    faults = iter([httpx.Response(503, json={"detail": "busy"})])
    replayed = []

    def fault(req: dict[str, Any]) -> httpx.Response | None:
        if req["op"] == "poll" and "after" not in req:  # the first poll after the submit
            response = next(faults, None)
            if response is not None:
                return response
            if not replayed:
                # The retried poll's answer repeats events the kernel already holds
                # (as an answer to a request resent from 0 would).
                replayed.append(True)
                events = agent.events[0:4]
                answer = {"ok": True, "events": events, "next": 4, "done": False}
                return exec_answer(json.dumps(answer) + "\n")
        return None

    agent.fault = fault
    relayed, done = await run(channel_for(agent), protocol.CellRequest(code="x"))
    assert [e["seq"] for e in relayed] == [0, 1, 2, 3, 4]
    assert [e.get("text") for e in relayed if e["type"] == "stream"] == ["a", "b", "c"]
    assert done["status"] == "ok"
    polls = [r for r in agent.requests if r["op"] == "poll"]
    # The faulty poll was sent twice, the same request both times.
    first = polls[0]
    assert [p for p in polls if p["rid"] == first["rid"]] == [first, first] and replayed


async def test_an_agent_that_does_not_answer_is_unreachable() -> None:
    agent = FakeAgent(SCRIPT)

    def fault(req: dict[str, Any]) -> httpx.Response | None:
        if req["op"] == "poll":
            return exec_answer("", UNREACHABLE_EXIT, "modbox-agent: unreachable")
        return None

    agent.fault = fault
    with pytest.raises(AgentUnreachable):
        await run(channel_for(agent), protocol.CellRequest(code="x"))


async def test_an_answer_cut_off_by_a_dying_agent_is_unreachable_too() -> None:
    agent = FakeAgent(SCRIPT)
    agent.fault = lambda req: exec_answer("") if req["op"] == "poll" else None
    with pytest.raises(AgentUnreachable):
        await run(channel_for(agent), protocol.CellRequest(code="x"))


async def test_a_large_request_goes_by_file_and_the_command_stays_small() -> None:
    uploaded: list[tuple[str, int]] = []
    commands: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/files/upload"):
            uploaded.append((request.url.path, len(request.content)))
            return httpx.Response(200, json={"path": "/uploads/x"})
        command = json.loads(request.content)["command"]
        commands.append(command)
        answer = {"ok": True, "events": [{"seq": 0, "type": "done", "status": "ok"}], "next": 1}
        return exec_answer(json.dumps({**answer, "done": True}) + "\n")

    info = SandboxInfo(id="sb-1", sandbox_url="https://sb-1.sandbox.test", access_token="t")
    runtime = SandboxRuntime(info, None, transport=httpx.MockTransport(handler))
    channel = AgentChannel(runtime, "/sandbox-home/.modbox", upload_dir="/sandbox-home/uploads")
    big = protocol.CellRequest(code="x = '" + "y" * 200_000 + "'")
    _, done = await run(channel, big)
    assert done["status"] == "ok"
    assert len(uploaded) == 1 and uploaded[0][1] > 200_000
    assert len(commands) == 1 and len(commands[0]) < 1000
    assert "@/sandbox-home/uploads/modbox-req-" in commands[0]


async def test_the_agent_route_is_used_when_advertised_and_exec_when_it_is_missing() -> None:
    # The local service's agent route (an extension): the request goes as-is, the
    # answer comes back as the agent's own line. A service that advertises the route
    # but answers 404 for it (an older one behind the same URL scheme) gets exec.
    agent = FakeAgent(SCRIPT)
    routed: list[dict[str, Any]] = []
    missing = {"yes": False}
    attempts: list[str] = []

    def transport(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/agent"):
            attempts.append(request.url.path)
            if missing["yes"]:
                return httpx.Response(404, json={"error": {"code": "not_found", "message": "?"}})
            body = json.loads(request.content)
            assert body["state_dir"] == "/sandbox-home/.modbox"
            routed.append(json.loads(base64.b64decode(body["request"])))
            command = f'"$T" {body["request"]} >&3'
            answer = agent(httpx.Request("POST", request.url, json={"command": command}))
            return httpx.Response(200, text=json.loads(answer.content)["stdout"])
        return agent(request)

    info = SandboxInfo(
        id="sb-1",
        sandbox_url="https://sb-1.sandbox.test",
        access_token="t",
        capabilities={"agent": "https://sb-1.sandbox.test/modbox/api/agent"},
    )
    runtime = SandboxRuntime(info, None, transport=httpx.MockTransport(transport))
    channel = AgentChannel(runtime, "/sandbox-home/.modbox", upload_dir=None)
    relayed, done = await run(channel, protocol.CellRequest(code="x"))
    assert [e["seq"] for e in relayed] == [0, 1, 2, 3, 4] and done["status"] == "ok"
    assert [r["op"] for r in routed] == ["execute", "poll", "poll", "poll"]
    missing["yes"] = True
    agent.requests.clear()
    relayed, done = await run(channel, protocol.CellRequest(code="y"))
    assert [e["seq"] for e in relayed] == [0, 1, 2, 3, 4] and done["status"] == "ok"
    assert len(attempts) == 5  # one refused try, then exec for the rest
    assert [r["op"] for r in agent.requests] == ["execute", "poll", "poll", "poll"]
