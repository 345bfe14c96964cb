"""The relay of agent events to IOPub, in process: coalescing, the output cap, progress.

No kernel and no sandbox: an :class:`OutputRelay` publishes into a list, as the kernel's
``send_response`` would to IOPub, and the events are the shapes the agent sends
(``modbox_kernel/agent/inside/protocol.py``).
"""

from __future__ import annotations

import asyncio
import base64
import types
from typing import Any

import pytest

from modbox_kernel import protocol
from modbox_kernel import relay as relay_module
from modbox_kernel.relay import GUARD_SLACK, STREAM_FLUSH_BYTES, STREAM_FLUSH_INTERVAL, OutputRelay

Message = tuple[str, dict[str, Any], dict[str, Any] | None, list[bytes] | None]


class Published(list[Message]):
    """What the relay published, in order."""

    def __call__(
        self,
        msg_type: str,
        content: dict[str, Any],
        metadata: dict[str, Any] | None,
        buffers: list[bytes] | None,
    ) -> None:
        self.append((msg_type, content, metadata, buffers))

    def types(self) -> list[str]:
        return [m[0] for m in self]

    def streams(self) -> list[tuple[str, str]]:
        return [(m[1]["name"], m[1]["text"]) for m in self if m[0] == "stream"]


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The relay's clock stands still unless a test moves it (asyncio's own does not),
    so "within one flush interval" does not depend on how loaded the machine is."""
    now = [1000.0]
    monkeypatch.setattr(relay_module, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    return now


def stream(name: str, text: str, seq: int = 0) -> dict[str, Any]:
    return {"seq": seq, "type": "stream", "name": name, "text": text}


async def test_a_flood_of_stream_events_becomes_few_messages_in_order() -> None:
    out = Published()
    relay = OutputRelay(out, silent=False)
    for i in range(1000):
        await relay.event(stream("stdout", f"{i}\n", i))
    relay.flush()
    text = "".join(t for _, t in out.streams())
    assert text == "".join(f"{i}\n" for i in range(1000))
    # All 1000 arrived within one flush interval: one message.
    assert len(out.streams()) == 1, out.types()


async def test_interleaved_stdout_and_stderr_keep_their_order() -> None:
    out = Published()
    relay = OutputRelay(out, silent=False)
    for name, text in [("stdout", "a"), ("stdout", "b"), ("stderr", "E"), ("stdout", "c")]:
        await relay.event(stream(name, text))
    relay.flush()
    assert out.streams() == [("stdout", "ab"), ("stderr", "E"), ("stdout", "c")]


async def test_buffered_text_goes_out_by_itself_within_the_interval() -> None:
    out = Published()
    relay = OutputRelay(out, silent=False)
    await relay.event(stream("stdout", "first\n"))
    await relay.event(stream("stdout", "second\n"))
    assert out == []  # held back to be coalesced
    await asyncio.sleep(STREAM_FLUSH_INTERVAL * 5)  # no further event: the timer sends it
    assert out.streams() == [("stdout", "first\nsecond\n")]


async def test_text_after_a_quiet_interval_goes_out_at_once(frozen_clock: list[float]) -> None:
    out = Published()
    relay = OutputRelay(out, silent=False)
    frozen_clock[0] += 2 * STREAM_FLUSH_INTERVAL
    await relay.event(stream("stdout", "late\n"))
    assert out.streams() == [("stdout", "late\n")]


async def test_a_large_burst_is_flushed_without_waiting() -> None:
    out = Published()
    relay = OutputRelay(out, silent=False)
    await relay.event(stream("stdout", "x"))
    await relay.event(stream("stdout", "y" * STREAM_FLUSH_BYTES))
    assert "".join(t for _, t in out.streams()) == "x" + "y" * STREAM_FLUSH_BYTES


async def test_other_output_flushes_the_pending_text_first() -> None:
    out = Published()
    relay = OutputRelay(out, silent=False, execution_count=7)
    await relay.event(stream("stdout", "a"))
    await relay.event(stream("stdout", "before\n"))
    await relay.event({"seq": 2, "type": "display_data", "data": {"text/plain": "d"}})
    await relay.event({"seq": 3, "type": "execute_result", "execution_count": 1, "data": {}})
    assert out.types() == ["stream", "display_data", "execute_result"]
    assert out.streams() == [("stdout", "abefore\n")]
    display, result = out[-2][1], out[-1][1]
    assert display == {"data": {"text/plain": "d"}, "metadata": {}, "transient": {}}
    assert result["execution_count"] == 7  # the kernel's count, whatever the agent said
    assert "seq" not in result and "type" not in result


async def test_the_guard_cuts_an_agent_that_ignores_the_limit_with_the_agents_notice() -> None:
    out = Published()
    limit = 1000
    relay = OutputRelay(out, silent=False, output_limit=limit)
    chunk = "z" * 4096
    for i in range(40):  # 160 KiB: past the limit and its slack
        await relay.event(stream("stdout", chunk, i))
    relay.flush()
    text = "".join(t for _, t in out.streams())
    notice = protocol.truncation_notice(limit)
    assert text.endswith(notice) and text.count("[Modbox: output") == 1
    assert len(text) == limit + GUARD_SLACK + len(notice)
    await relay.event(stream("stdout", "more"))
    relay.flush()
    assert "".join(t for _, t in out.streams()) == text  # nothing after the notice


async def test_the_agents_own_notice_is_not_cut_again() -> None:
    out = Published()
    limit = 100
    relay = OutputRelay(out, silent=False, output_limit=limit)
    cut = "q" * limit + protocol.truncation_notice(limit)
    await relay.event(stream("stdout", cut))
    relay.flush()
    assert "".join(t for _, t in out.streams()) == cut


async def test_a_silent_request_publishes_errors_and_comms_only() -> None:
    out = Published()
    relay = OutputRelay(out, silent=True)
    await relay.event(stream("stdout", "hidden"))
    await relay.event({"seq": 1, "type": "display_data", "data": {"text/plain": "x"}})
    await relay.event({"seq": 2, "type": "error", "ename": "E", "evalue": "v", "traceback": []})
    buffer = base64.b64encode(b"\x00\x01").decode()
    comm = {"seq": 3, "type": "comm_msg", "comm_id": "c1", "data": {"k": 1}}
    comm.update({"_metadata": {"m": 2}, "_buffers": [buffer]})
    await relay.event(comm)
    relay.flush()
    assert out.types() == ["error", "comm_msg"]
    _, content, metadata, buffers = out[1]
    assert content == {"comm_id": "c1", "data": {"k": 1}}
    assert metadata == {"m": 2} and buffers == [b"\x00\x01"]


async def test_errors_pass_through_the_rewrite_and_input_requests_are_answered() -> None:
    out = Published()
    asked: list[dict[str, Any]] = []

    async def answer(event: dict[str, Any]) -> None:
        asked.append(event)

    def rewrite(error: dict[str, Any]) -> dict[str, Any]:
        return {**error, "ename": "Rewritten"}

    relay = OutputRelay(out, silent=False, answer_input=answer, rewrite_error=rewrite)
    await relay.event({"seq": 0, "type": "input_request", "prompt": "?", "password": False})
    await relay.event({"seq": 1, "type": "error", "ename": "KeyboardInterrupt", "evalue": ""})
    assert [e["prompt"] for e in asked] == ["?"]
    assert out.types() == ["error"] and out[0][1]["ename"] == "Rewritten"


async def test_unknown_event_types_are_not_published() -> None:
    out = Published()
    relay = OutputRelay(out, silent=False)
    await relay.event({"seq": 0, "type": "something_new", "x": 1})
    relay.flush()
    assert out == []


async def test_the_progress_line_is_one_display_updated_then_cleared() -> None:
    out = Published()
    relay = OutputRelay(out, silent=False)
    relay.progress("Starting… 1 s", update=False)
    relay.progress("Starting… 2 s", update=True)
    relay.clear_progress()
    assert out.types() == ["display_data", "update_display_data", "clear_output"]
    ids = {m[1]["transient"]["display_id"] for m in out[:2]}
    assert len(ids) == 1
    other = Published()
    OutputRelay(other, silent=False).progress("x", update=False)
    assert other[0][1]["transient"]["display_id"] not in ids  # one id per relay
