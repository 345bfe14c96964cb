"""Comms (ipywidgets' transport) in both directions, compared with the python3 kernel.

The same scenario runs against both kernels through jupyter_client, and what a
frontend sees must match: the comm_open messages and the widget view of a cell that
creates a slider, the echo and the ``observe`` callback's output when the frontend
moves it, the value the next cell reads, comm_info, a frontend-opened
``jupyter.widget.control`` comm answering ``request_states``, and binary buffers.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from typing import Any

import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from kernel_helpers import (
    KERNEL_NAME,
    REFERENCE_KERNEL,
    env_for_kernel,
    run_cell,
    start_kernel,
    stop_kernel,
)

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(180)]

SLIDER_CELL = (
    "import ipywidgets as w\n"
    "s = w.IntSlider(value=1, description='n')\n"
    "s.observe(lambda change: print('changed to', change['new']), names='value')\n"
    "s"
)
BUFFER_CELL = (
    "import comm\n"
    "echo = comm.create_comm(target_name='modbox.test', data={'x': 1}, buffers=[b'\\x00\\xffab'])"
)
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def _send(
    kc: BlockingKernelClient,
    msg_type: str,
    content: dict[str, Any],
    metadata: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Send a shell message as a frontend would; its IOPub messages up to idle."""
    return _send_msg(kc, kc.session.msg(msg_type, content, metadata=metadata or {}))


def _send_msg(kc: BlockingKernelClient, msg: dict[str, Any]) -> list[dict[str, Any]]:
    """Send ``msg``; its IOPub messages up to idle, each with its ``arrived`` time."""
    kc.shell_channel.send(msg)
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            got = kc.get_iopub_msg(timeout=0.5)
        except queue.Empty:
            continue
        if got["parent_header"].get("msg_id") != msg["header"]["msg_id"]:
            continue
        if got["msg_type"] == "status":
            if got["content"]["execution_state"] == "idle":
                return seen
            continue
        got["arrived"] = time.monotonic()
        seen.append(got)
    raise AssertionError(f"no idle after {msg['msg_type']}; so far {seen}")


def _scenario(kc: BlockingKernelClient) -> dict[str, Any]:
    """What a frontend sees; ids (random per run) are replaced by their roles."""
    created = run_cell(kc, SLIDER_CELL)
    assert created.status == "ok", created.describe()
    opened = [m["content"] for m in created.outputs if m["msg_type"] == "comm_open"]
    views = [m["content"]["data"] for m in created.outputs if m["msg_type"] == "execute_result"]
    assert len(views) == 1 and WIDGET_VIEW in views[0], created.describe()
    slider = views[0][WIDGET_VIEW]["model_id"]

    moved = _send(
        kc,
        "comm_msg",
        {
            "comm_id": slider,
            "data": {"method": "update", "state": {"value": 7}, "buffer_paths": []},
        },
    )
    after = run_cell(kc, "print(s.value)")

    kc.comm_info(target_name="jupyter.widget")
    info = kc.get_shell_msg(timeout=30)["content"]

    control = "control-comm-of-this-test"
    # What JupyterLab does on reload to fetch every widget's state (control protocol 1).
    opening = {"comm_id": control, "target_name": "jupyter.widget.control", "data": {}}
    _send(kc, "comm_open", opening, metadata={"version": "1.0.0"})
    states = _send(kc, "comm_msg", {"comm_id": control, "data": {"method": "request_states"}})

    buffered = run_cell(kc, BUFFER_CELL)
    buffers = [
        [bytes(b) for b in m.get("buffers", [])]
        for m in buffered.outputs
        if m["msg_type"] == "comm_open"
    ]
    return {
        "opened": [(c["target_name"], c["data"]["state"]["_model_name"]) for c in opened],
        "view_mimes": sorted(views[0]),
        "moved": [
            (m["msg_type"], m["content"].get("text") or m["content"]["data"]["method"])
            for m in moved
        ],
        "echo_state": [
            m["content"]["data"].get("state") for m in moved if m["msg_type"] == "comm_msg"
        ],
        "value_after": after.stdout,
        "comm_info": sorted(v["target_name"] for v in info["comms"].values()),
        "states_method": [m["content"].get("data", {}).get("method") for m in states],
        "slider_in_states": [
            slider in m["content"].get("data", {}).get("states", {}) for m in states
        ],
        "buffers": buffers,
    }


@pytest.fixture
def both(request: pytest.FixtureRequest) -> Iterator[dict[str, BlockingKernelClient]]:
    started = {}
    try:
        for name in (REFERENCE_KERNEL, KERNEL_NAME):
            started[name] = start_kernel(name, env_for_kernel(request, name))
        yield {name: kc for name, (_, kc) in started.items()}
    finally:
        for km, kc in started.values():
            stop_kernel(km, kc)


def test_widgets_and_comms_behave_as_under_python3(both: dict[str, BlockingKernelClient]) -> None:
    seen = {name: _scenario(kc) for name, kc in both.items()}
    modbox = seen[KERNEL_NAME]
    assert modbox == seen[REFERENCE_KERNEL]
    # And what that is, so two equally broken kernels do not pass.
    assert ("jupyter.widget", "IntSliderModel") in modbox["opened"]
    assert modbox["moved"] == [("comm_msg", "echo_update"), ("stream", "changed to 7\n")]
    assert modbox["value_after"] == "7\n"
    assert len(modbox["comm_info"]) >= 3
    assert modbox["states_method"] == ["update_states"] and modbox["slider_in_states"] == [True]
    assert modbox["buffers"] == [[b"\x00\xffab"]]


INTERACT_CELL = (
    "import ipywidgets as w\n"
    "def show(x):\n"
    "    print('x is', x)\n"
    "ui = w.interactive(show, x=(0, 10))\n"
    "display(ui)"
)


def _interact(kc: BlockingKernelClient) -> list[Any]:
    """Move an ``interact`` slider; what the frontend is told, request ids as roles."""
    created = run_cell(kc, INTERACT_CELL)
    assert created.status == "ok", created.describe()
    slider = next(
        m["content"]["comm_id"]
        for m in created.outputs
        if m["msg_type"] == "comm_open"
        and m["content"]["data"]["state"]["_model_name"] == "IntSliderModel"
    )
    update = {"method": "update", "state": {"value": 7}, "buffer_paths": []}
    msg = kc.session.msg("comm_msg", {"comm_id": slider, "data": update})
    seen = _send_msg(kc, msg)
    request = msg["header"]["msg_id"]
    summary: list[Any] = []
    for m in seen:
        if m["msg_type"] == "stream":
            summary.append(("stream", m["content"]["text"]))
        elif m["msg_type"] == "comm_msg":
            state = m["content"]["data"].get("state", {})
            if "msg_id" in state:  # the Output widget claiming (then releasing) output
                claimed = {request: "<this request>", "": ""}.get(state["msg_id"], "<other>")
                summary.append(("output widget msg_id", claimed))
    return summary


def test_interact_output_is_claimed_by_its_output_widget(
    both: dict[str, BlockingKernelClient],
) -> None:
    # The function's output, printed while the frontend moves the slider, belongs in
    # the interact's Output widget: the widget claims the comm_msg's id, as under
    # ipykernel, so the frontend routes the stream into it.
    seen = {name: _interact(kc) for name, kc in both.items()}
    assert seen[KERNEL_NAME] == seen[REFERENCE_KERNEL]
    assert ("output widget msg_id", "<this request>") in seen[KERNEL_NAME], seen
    assert ("stream", "x is 7\n") in seen[KERNEL_NAME], seen


SLOW_BUTTON_CELL = (
    "import time\n"
    "import ipywidgets as w\n"
    "button = w.Button(description='run')\n"
    "def work(_):\n"
    "    print('started', flush=True)\n"
    "    time.sleep(11)\n"
    "    print('finished', flush=True)\n"
    "button.on_click(work)\n"
    "button"
)


def test_a_long_button_callback_streams_its_output(request: pytest.FixtureRequest) -> None:
    # A button that starts a long job: its output must arrive as it is printed and in
    # full, however long the callback runs (longer than any single request to the
    # sandbox may wait).
    km, kc = start_kernel(KERNEL_NAME, env_for_kernel(request))
    try:
        created = run_cell(kc, SLOW_BUTTON_CELL)
        assert created.status == "ok", created.describe()
        (view,) = [
            o["content"]["data"][WIDGET_VIEW]
            for o in created.outputs
            if o["msg_type"] == "execute_result"
        ]
        button = view["model_id"]
        msg = kc.session.msg(
            "comm_msg",
            {"comm_id": button, "data": {"method": "custom", "content": {"event": "click"}}},
        )
        sent = time.monotonic()
        seen = _send_msg(kc, msg)
        idle_at = time.monotonic() - sent
        arrivals = {
            line: m["arrived"] - sent
            for m in seen
            if m["msg_type"] == "stream"
            for line in m["content"]["text"].split()
        }
        assert set(arrivals) == {"started", "finished"}, arrivals
        assert arrivals["started"] < idle_at - 5, (arrivals, idle_at)  # streamed, not at the end
        after = run_cell(kc, "print('still here')")
        assert after.stdout == "still here\n", after.describe()
    finally:
        stop_kernel(km, kc)


def _interrupt_with_a_comm_message_waiting(km: Any, kc: BlockingKernelClient) -> dict[str, Any]:
    """A frontend moves a slider while a cell sleeps, then interrupts the cell."""
    created = run_cell(kc, "kept = 'yes'\n" + SLIDER_CELL)
    assert created.status == "ok", created.describe()
    (view,) = [
        m["content"]["data"][WIDGET_VIEW]
        for m in created.outputs
        if m["msg_type"] == "execute_result"
    ]
    sleeping = kc.execute("import time\ntime.sleep(30)")
    time.sleep(1.0)
    update = {"method": "update", "state": {"value": 3}, "buffer_paths": []}
    kc.shell_channel.send(kc.session.msg("comm_msg", {"comm_id": view["model_id"], "data": update}))
    time.sleep(0.5)
    started = time.monotonic()
    km.interrupt_kernel()
    reply = None
    while reply is None:
        msg = kc.get_shell_msg(timeout=30)
        if msg["parent_header"].get("msg_id") == sleeping:
            reply = msg
    took = time.monotonic() - started
    time.sleep(0.5)  # the comm message is handled after the cell
    after = run_cell(kc, "print(kept, s.value)")
    return {
        "ename": reply["content"].get("ename"),
        "quick": took < 2.5,  # well before the 3 s escalation (which loses variables)
        "after": after.stdout,
    }


def test_an_interrupt_reaches_the_cell_while_a_comm_message_waits(
    request: pytest.FixtureRequest,
) -> None:
    # A comm message that arrives while a cell runs is dispatched at once by ipykernel
    # and waits in the sandbox behind the cell; the interrupt must still stop the cell,
    # not the waiting comm message, so nothing escalates and the variables survive.
    seen = {}
    for name in (REFERENCE_KERNEL, KERNEL_NAME):
        km, kc = start_kernel(name, env_for_kernel(request, name))
        try:
            seen[name] = _interrupt_with_a_comm_message_waiting(km, kc)
        finally:
            stop_kernel(km, kc)
    assert seen[KERNEL_NAME] == seen[REFERENCE_KERNEL]
    assert seen[KERNEL_NAME] == {"ename": "KeyboardInterrupt", "quick": True, "after": "yes 3\n"}
