"""The execute reply waits for the client's echoes of what an Output widget captured.

Unit tests of ``modbox_kernel/widgetecho.py`` with the messages nbclient and JupyterLab
send; ``tests/test_kernel_background.py`` runs the same rule through a real kernel.
"""

from __future__ import annotations

import asyncio
from typing import Any

from modbox_kernel.widgetecho import OutputWidgetEchoes


def _parent(msg_id: str) -> dict[str, Any]:
    return {"header": {"msg_id": msg_id, "msg_type": "execute_request"}}


def _capture(echoes: OutputWidgetEchoes, comm_id: str, msg_id: str) -> None:
    """The sandbox's ``with out:`` (msg_id set) or its end (msg_id '')."""
    content = {"comm_id": comm_id, "data": {"method": "update", "state": {"msg_id": msg_id}}}
    echoes.published("comm_msg", content, _parent(msg_id or "other"))


def _echo(parent_msg_id: str) -> dict[str, Any]:
    """nbclient's echo of an Output widget's outputs (parent: the captured output's)."""
    return {
        "header": {"msg_type": "comm_msg"},
        "parent_header": {"msg_id": parent_msg_id} if parent_msg_id else {},
        "content": {
            "comm_id": "w1",
            "data": {"method": "update", "state": {"outputs": []}, "buffer_paths": []},
        },
    }


async def _returns_within(awaitable: Any, seconds: float) -> bool:
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        task.cancel()
    return bool(done)


async def test_a_request_without_captured_output_is_not_held() -> None:
    echoes = OutputWidgetEchoes(wait=5)
    echoes.published("stream", {"name": "stdout", "text": "x"}, _parent("a"))
    _capture(echoes, "w1", "b")
    echoes.published("stream", {"name": "stdout", "text": "y"}, _parent("a"))  # not b's
    assert await _returns_within(echoes.settled("a"), 0.5)


async def test_the_reply_waits_for_one_echo_per_captured_output() -> None:
    echoes = OutputWidgetEchoes(wait=5)
    _capture(echoes, "w1", "r")
    echoes.published("stream", {"name": "stdout", "text": "x"}, _parent("r"))
    echoes.published("clear_output", {"wait": True}, _parent("r"))  # no echo of its own
    echoes.published("error", {"ename": "E", "evalue": "", "traceback": []}, _parent("r"))
    echoes.published("status", {"execution_state": "busy"}, _parent("r"))
    _capture(echoes, "w1", "")
    echoes.published("stream", {"name": "stdout", "text": "after"}, _parent("r"))  # not captured
    settled = asyncio.ensure_future(echoes.settled("r"))
    await asyncio.sleep(0.1)
    assert not settled.done()
    echoes.received(_echo("r"))
    await asyncio.sleep(0.1)
    assert not settled.done()  # two outputs were captured, one echo came
    echoes.received(_echo("r"))
    assert await _returns_within(settled, 0.5)
    assert echoes.echoes is True


async def test_an_immediate_clear_output_is_echoed_too() -> None:
    echoes = OutputWidgetEchoes(wait=5)
    _capture(echoes, "w1", "r")
    echoes.published("clear_output", {"wait": False}, _parent("r"))
    settled = asyncio.ensure_future(echoes.settled("r"))
    await asyncio.sleep(0.1)
    assert not settled.done()
    echoes.received(_echo("r"))
    assert await _returns_within(settled, 0.5)


async def test_a_client_echoing_without_a_parent_is_never_waited_for() -> None:
    echoes = OutputWidgetEchoes(wait=5)
    _capture(echoes, "w1", "r")
    echoes.published("stream", {"name": "stdout", "text": "x"}, _parent("r"))
    settled = asyncio.ensure_future(echoes.settled("r"))
    await asyncio.sleep(0.05)
    echoes.received(_echo(""))  # JupyterLab's echo: no parent header
    assert echoes.echoes is False
    # The wait in progress ends; later requests do not wait at all.
    assert await _returns_within(settled, 0.5)
    _capture(echoes, "w1", "s")
    echoes.published("stream", {"name": "stdout", "text": "x"}, _parent("s"))
    assert await _returns_within(echoes.settled("s"), 0.1)


async def test_a_client_that_never_echoes_is_waited_for_once() -> None:
    echoes = OutputWidgetEchoes(wait=0.3)
    _capture(echoes, "w1", "r")
    echoes.published("stream", {"name": "stdout", "text": "x"}, _parent("r"))
    loop = asyncio.get_running_loop()
    started = loop.time()
    await echoes.settled("r")
    assert loop.time() - started >= 0.29
    assert echoes.echoes is False
    _capture(echoes, "w1", "s")
    echoes.published("stream", {"name": "stdout", "text": "x"}, _parent("s"))
    assert await _returns_within(echoes.settled("s"), 0.1)


async def test_a_closed_widget_captures_nothing() -> None:
    echoes = OutputWidgetEchoes(wait=5)
    _capture(echoes, "w1", "r")
    echoes.published("comm_close", {"comm_id": "w1", "data": {}}, _parent("r"))
    echoes.published("stream", {"name": "stdout", "text": "x"}, _parent("r"))
    assert await _returns_within(echoes.settled("r"), 0.5)
