"""The debugger across the sandbox boundary, and the sandbox's resource figures.

The protocol tests follow ipykernel's own debugger tests (``tests/test_debugger.py`` of
ipykernel): the Debug Adapter Protocol through ``debug_request`` on the control
channel and ``debug_event`` on IOPub. The same session runs against the stock python3
kernel (ipykernel with debugpy) and modbox-python, and what a frontend shows -- the
stop, the frames, the variables, the stepped line, the rich view -- must be the same.
modbox-python talks to the shared test service, so its sandbox is not a child of the
kernel: the usage figures must come from the sandbox itself.
"""

from __future__ import annotations

import itertools
import queue
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client import BlockingKernelClient
from kernel_helpers import (
    KERNEL_NAME,
    REFERENCE_KERNEL,
    embedded_env,
    env_for_kernel,
    only_modbox,
    run_cell,
    running_kernel,
    service_env,
    start_kernel,
    stop_kernel,
)
from service_helpers import running_local_service

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(240)]

_seq = itertools.count(1)

INITIALIZE = {
    "clientID": "test-client",
    "clientName": "testClient",
    "adapterID": "",
    "pathFormat": "path",
    "linesStartAt1": True,
    "columnsStartAt1": True,
    "supportsVariableType": True,
    "supportsVariablePaging": True,
    "supportsRunInTerminalRequest": True,
    "locale": "en",
}

CODE = "def f(a, b):\n    c = a + b\n    return c\n\nresult = f(2, 3)\nagain = f(1, 1)"


def debug(kc: BlockingKernelClient, command: str, arguments: Any = None) -> dict[str, Any]:
    """One debug_request; its reply's content (never waits more than 30 s)."""
    msg = kc.session.msg(
        "debug_request",
        {"type": "request", "seq": next(_seq), "command": command, "arguments": arguments or {}},
    )
    kc.control_channel.send(msg)
    deadline = time.monotonic() + 30
    while True:
        reply = kc.control_channel.get_msg(timeout=max(0.1, deadline - time.monotonic()))
        if reply["parent_header"].get("msg_id") == msg["header"]["msg_id"]:
            assert reply["msg_type"] == "debug_reply"
            content: dict[str, Any] = reply["content"]
            return content


def debug_event(kc: BlockingKernelClient, event: str, timeout: float = 30) -> dict[str, Any]:
    """The next ``debug_event`` named ``event`` on IOPub (others are skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no {event!r} debug_event within {timeout} s")
        try:
            msg = kc.get_iopub_msg(timeout=left)
        except queue.Empty:
            continue
        if msg["msg_type"] == "debug_event" and msg["content"].get("event") == event:
            content: dict[str, Any] = msg["content"]
            return content


def execute_reply(kc: BlockingKernelClient, msg_id: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        reply = kc.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
        if reply["parent_header"].get("msg_id") == msg_id:
            return reply


def start_debugging(kc: BlockingKernelClient) -> None:
    reply = debug(kc, "initialize", INITIALIZE)
    assert reply["success"], str(reply)
    assert debug(kc, "attach")["success"]


def set_breakpoint(kc: BlockingKernelClient, code: str, line: int) -> str:
    """Dump ``code``, break at ``line`` of it, finish the configuration; the cell's path."""
    source = debug(kc, "dumpCell", {"code": code})["body"]["sourcePath"]
    reply = debug(
        kc,
        "setBreakpoints",
        {"breakpoints": [{"line": line}], "source": {"path": source}, "sourceModified": False},
    )
    assert reply["success"], str(reply)
    assert reply["body"]["breakpoints"][0]["verified"]
    assert debug(kc, "configurationDone")["success"]
    return str(source)


def variables_of(kc: BlockingKernelClient, frame_id: int, scope: str) -> dict[str, str]:
    scopes = debug(kc, "scopes", {"frameId": frame_id})["body"]["scopes"]
    ref = next(s for s in scopes if s["name"] == scope)["variablesReference"]
    found = debug(kc, "variables", {"variablesReference": ref})["body"]["variables"]
    return {v["name"]: v["value"] for v in found}


def debugging_session(kc: BlockingKernelClient) -> dict[str, Any]:
    """The whole walk of ipykernel's tests, as what a frontend would show."""
    seen: dict[str, Any] = {}
    start_debugging(kc)
    info = debug(kc, "debugInfo")["body"]
    # Before any stop (the stock kernel's view of stopped threads goes stale after one).
    assert run_cell(kc, "text = 'Hello the world'").status == "ok"
    rich = debug(kc, "richInspectVariables", {"variableName": "text"})
    seen["rich_text_not_stopped"] = rich["body"]["data"]
    source = set_breakpoint(kc, CODE, 2)
    seen["source_named_as_announced"] = source.startswith(
        info["tmpFilePrefix"]
    ) and source.endswith(info["tmpFileSuffix"])
    seen["breakpoint_listed"] = [
        b["breakpoints"] for b in debug(kc, "debugInfo")["body"]["breakpoints"]
    ]
    msg_id = kc.execute(CODE)
    stopped = debug_event(kc, "stopped")
    seen["reason"] = stopped["body"]["reason"]
    thread = stopped["body"]["threadId"]
    frames = debug(kc, "stackTrace", {"threadId": thread})["body"]["stackFrames"]
    seen["frames"] = [(f["name"], f["line"]) for f in frames]
    seen["locals_at_stop"] = variables_of(kc, frames[0]["id"], "Locals")
    assert debug(kc, "next", {"threadId": thread})["success"]
    stopped = debug_event(kc, "stopped")
    seen["reason_after_next"] = stopped["body"]["reason"]
    frames = debug(kc, "stackTrace", {"threadId": thread})["body"]["stackFrames"]
    seen["line_after_next"] = frames[0]["line"]
    seen["locals_after_next"] = variables_of(kc, frames[0]["id"], "Locals")
    rich = debug(kc, "richInspectVariables", {"variableName": "c", "frameId": frames[0]["id"]})
    seen["rich_c"] = rich["body"]["data"]
    copied = debug(
        kc,
        "copyToGlobals",
        {"srcVariableName": "c", "dstVariableName": "c_copy", "srcFrameId": frames[0]["id"]},
    )
    seen["copied"] = copied["success"]
    seen["globals_hold_copy"] = variables_of(kc, frames[0]["id"], "Globals").get("c_copy")
    seen["evaluate"] = debug(
        kc, "evaluate", {"expression": "a * 10", "frameId": frames[0]["id"], "context": "repl"}
    )["body"]["result"]
    # Out of f, over to the next line, into f again.
    for command in ("stepOut", "next", "stepIn"):
        assert debug(kc, command, {"threadId": thread})["success"], command
        stopped = debug_event(kc, "stopped")
        top = debug(kc, "stackTrace", {"threadId": thread})["body"]["stackFrames"][0]
        seen[f"after_{command}"] = (stopped["body"]["reason"], top["name"], top["line"])
    seen["locals_after_stepIn"] = variables_of(kc, top["id"], "Locals")
    assert debug(kc, "continue", {"threadId": thread})["success"]
    reply = execute_reply(kc, msg_id)
    seen["cell_status"] = reply["content"]["status"]
    names = {v["name"]: v["value"] for v in debug(kc, "inspectVariables")["body"]["variables"]}
    seen["namespace"] = {k: names.get(k) for k in ("result", "c_copy")}
    assert debug(kc, "disconnect", {"restart": False, "terminateDebuggee": True})["success"]
    after = run_cell(kc, "print(result, c_copy)")
    seen["next_cell"] = (after.status, after.stdout)
    return seen


@pytest.fixture(scope="module")
def modbox(local_service: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    with running_kernel(KERNEL_NAME, env_for_kernel(request)) as kernel:
        yield kernel


def test_a_debugging_session_shows_what_the_stock_kernel_shows(modbox: Any) -> None:
    features = modbox.kc.kernel_info(reply=True, timeout=10)["content"]["supported_features"]
    assert "debugger" in features
    with running_kernel(REFERENCE_KERNEL, embedded_env()) as reference:
        expected = debugging_session(reference.kc)
    got = debugging_session(modbox.kc)
    assert got == expected
    # What the walk must have seen, so that two equally broken kernels cannot pass.
    assert got["reason"] == "breakpoint" and got["frames"][0] == ("f", 2)
    assert got["locals_at_stop"] == {"a": "2", "b": "3"}
    assert got["line_after_next"] == 3 and got["locals_after_next"]["c"] == "5"
    assert got["rich_c"] == {"text/plain": "5"} and got["globals_hold_copy"] == "5"
    assert got["after_stepOut"][1:] == ("<module>", 5) and got["after_next"][1:] == ("<module>", 6)
    assert got["after_stepIn"][1:] == ("f", 2) and got["locals_after_stepIn"] == {
        "a": "1",
        "b": "1",
    }
    assert got["namespace"] == {"result": "5", "c_copy": "5"}
    assert got["rich_text_not_stopped"] == {"text/plain": "'Hello the world'"}
    assert got["next_cell"] == ("ok", "5 5\n")


@only_modbox("an interrupt at a breakpoint goes through the agent: its own path")
def test_an_interrupt_at_a_breakpoint_ends_the_cell_and_debugging_goes_on(modbox: Any) -> None:
    kc = modbox.kc
    start_debugging(kc)
    code = "import time\ndef g():\n    x = 1\n    return x\n\ng()\ntime.sleep(30)"
    set_breakpoint(kc, code, 3)
    msg_id = kc.execute(code)
    debug_event(kc, "stopped")
    t0 = time.monotonic()
    modbox.km.interrupt_kernel()
    reply = execute_reply(kc, msg_id)
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    assert time.monotonic() - t0 < 10
    assert run_cell(kc, "print('still here')").stdout == "still here\n"
    # Breakpoints still stop cells: the cell's thread is still traced.
    quick = code.replace("time.sleep(30)", "pass")
    set_breakpoint(kc, quick, 3)
    msg_id = kc.execute(quick)
    stopped = debug_event(kc, "stopped")
    assert debug(kc, "debugInfo")["body"]["stoppedThreads"]
    assert debug(kc, "continue", {"threadId": stopped["body"]["threadId"]})["success"]
    assert execute_reply(kc, msg_id)["content"]["status"] == "ok"
    assert debug(kc, "disconnect", {"restart": False, "terminateDebuggee": True})["success"]


@only_modbox("debugpy is always importable beside the stock kernel")
def test_without_debugpy_in_the_sandbox_nothing_is_advertised_and_requests_fail_clearly(
    local_service: Any, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    # The sandbox's agent acts as if debugpy were not installed (its environment says
    # so, through the kernel's own sandbox_env setting in its config file).
    profile = tmp_path / "ipython" / "profile_default"
    profile.mkdir(parents=True)
    (profile / "modbox_kernel_config.py").write_text(
        "c.ModboxKernel.sandbox_env = {'MODBOX_AGENT_NO_DEBUGGER': '1'}\n"
    )
    env = {**env_for_kernel(request), "IPYTHONDIR": str(tmp_path / "ipython")}
    with running_kernel(KERNEL_NAME, env) as kernel:
        kc = kernel.kc
        info = kc.kernel_info(reply=True, timeout=10)["content"]
        assert "debugger" not in info["supported_features"]
        t0 = time.monotonic()
        reply = debug(kc, "initialize", INITIALIZE)
        assert time.monotonic() - t0 < 10
        assert reply["success"] is False
        assert (
            "not available" in reply["message"] and "MODBOX_AGENT_NO_DEBUGGER" in reply["message"]
        )
        assert debug(kc, "dumpCell", {"code": "1"})["success"] is False
        assert run_cell(kc, "print(6 * 7)").stdout == "42\n"


def usage(kc: BlockingKernelClient) -> dict[str, Any]:
    msg = kc.session.msg("usage_request", {})
    kc.control_channel.send(msg)
    while True:
        reply = kc.control_channel.get_msg(timeout=30)
        if reply["parent_header"].get("msg_id") == msg["header"]["msg_id"]:
            assert reply["msg_type"] == "usage_reply"
            content: dict[str, Any] = reply["content"]
            return content


@only_modbox("the stock kernel measures its own processes")
def test_usage_and_cell_figures_come_from_the_sandbox(modbox: Any) -> None:
    kc = modbox.kc
    before = usage(kc)
    for field in ("kernel_cpu", "kernel_memory", "cpu_count", "host_virtual_memory"):
        assert field in before, before
    assert before["modbox"]["sandbox_id"]
    assert before["host_virtual_memory"]["total"] == before["modbox"]["memory_limit_bytes"]
    run = run_cell(
        kc, "held = bytearray(300 * 1024 * 1024)\nheld[::4096] = b'x' * len(held[::4096])"
    )
    assert run.status == "ok", run.describe()
    meta = run.reply["metadata"]["modbox"]
    assert meta["seconds"] > 0 and meta["peak_memory_bytes"] > 300 * 1024 * 1024, meta
    grown = usage(kc)["kernel_memory"] - before["kernel_memory"]
    assert 0.8 * 300 * 2**20 <= grown <= 1.2 * 300 * 2**20, grown
    spin = run_cell(
        kc, "import time\nt = time.process_time()\nwhile time.process_time() - t < 1.0: pass"
    )
    figures = spin.reply["metadata"]["modbox"]
    assert 0.8 <= figures["cpu_seconds"] <= 1.5, figures
    assert usage(kc)["kernel_cpu"] > 0
    run_cell(kc, "del held")


@only_modbox("the stock kernel has no sandbox to wait for")
def test_debug_requests_never_hold_the_control_channel_while_the_sandbox_waits(
    tmp_path: Path,
) -> None:
    # A full service: the kernel's sandbox waits in line. JupyterLab asks debugInfo as
    # it connects; the answer must come at once, and an interrupt right behind it too.
    log = tmp_path / "service.log"
    with running_local_service(log, "--max-sandboxes", "1") as service:
        with service.client() as control:
            assert control.post("/sandboxes", json={}).status_code == 200
        km, kc = start_kernel(KERNEL_NAME, service_env(service.base_url, service.token))
        try:
            t0 = time.monotonic()
            info = debug(kc, "debugInfo")
            assert info["success"] and info["body"]["isStarted"] is False, info
            refused = debug(kc, "initialize", INITIALIZE)
            assert refused["success"] is False and "still starting" in refused["message"]
            msg = kc.session.msg("interrupt_request", {})
            kc.control_channel.send(msg)
            assert kc.control_channel.get_msg(timeout=10)["msg_type"] == "interrupt_reply"
            assert time.monotonic() - t0 < 8
        finally:
            stop_kernel(km, kc)
