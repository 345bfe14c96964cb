"""Provisioning failures end the cell with a sentence naming the cause; the next cell retries.

Real kernels against the real local service (or a port where nothing listens). Each case
checks the error reply *and* the published error output (papermill reads the latter),
that kernel_info was answered at once while provisioning was still going on or failing,
and that the kernel stays alive and tries again on the next cell.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from kernel_helpers import (
    list_sandboxes,
    only_modbox,
    run_cell,
    service_env,
    start_kernel,
    stop_kernel,
    wait_until,
)

pytestmark = [pytest.mark.kernel, only_modbox("provisioning is specific to modbox-python")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _error_of(run: Any) -> tuple[str, str, list[str]]:
    reply = run.reply["content"]
    assert reply["status"] == "error", run.describe()
    shown = [m["content"] for m in run.outputs if m["msg_type"] == "error"]
    assert len(shown) == 1, run.describe()
    assert shown[0]["evalue"] == reply["evalue"]
    return reply["ename"], reply["evalue"], reply["traceback"]


@pytest.fixture
def kernel_with(request: pytest.FixtureRequest) -> Iterator[Any]:
    started: list[tuple[Any, Any]] = []

    def start(env: dict[str, str]) -> tuple[Any, Any]:
        km, kc = start_kernel("modbox-python", env)
        started.append((km, kc))
        return km, kc

    yield start
    for km, kc in started:
        stop_kernel(km, kc)


@pytest.mark.timeout(120)
def test_a_wrong_token_names_the_setting_and_the_next_cell_retries(
    local_service: Any, kernel_with: Any
) -> None:
    env = service_env(local_service.base_url, "not-the-token")
    km, kc = kernel_with(env)
    t0 = time.monotonic()
    info = kc.kernel_info(reply=True, timeout=10)
    assert time.monotonic() - t0 < 2, "kernel_info must not wait for provisioning"
    assert info["content"]["language_info"]["name"] == "python"

    first = run_cell(kc, "1+1", timeout=60)
    ename, evalue, _ = _error_of(first)
    assert ename == "SandboxUnavailable"
    assert "401" in evalue and "MODBOX_API_TOKEN" in evalue, evalue

    # Not cached: the next cell makes a new attempt (and fails the same way).
    second = run_cell(kc, "1+1", timeout=60)
    assert _error_of(second)[1] == evalue
    assert km.is_alive()


@pytest.mark.timeout(120)
def test_an_unreachable_service_is_named(kernel_with: Any) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    km, kc = kernel_with(service_env(url, "some-token"))
    run = run_cell(kc, "1+1", timeout=90)
    _, evalue, _ = _error_of(run)
    assert url in evalue and "MODBOX_API_URL" in evalue, evalue
    assert km.is_alive()


@pytest.mark.timeout(120)
def test_an_unknown_image_is_named(local_service: Any, kernel_with: Any) -> None:
    env = service_env(local_service.base_url, local_service.token)
    env["MODBOX_IMAGE_ID"] = "00000000-0000-0000-0000-000000000000"
    _, kc = kernel_with(env)
    run = run_cell(kc, "1+1", timeout=60)
    _, evalue, _ = _error_of(run)
    assert "image_not_found" in evalue and "00000000-0000" in evalue, evalue


@pytest.mark.timeout(120)
def test_a_startup_timeout_is_named_and_leaves_no_sandbox(
    local_service: Any, kernel_with: Any
) -> None:
    base, token = local_service.base_url, local_service.token

    def running() -> set[str]:
        return {s["id"] for s in list_sandboxes(base, token, status="running")}

    before = running()
    env = service_env(base, token)
    # Far too short for create + wait + agent start: the deadline passes mid-way.
    env["MODBOX_STARTUP_TIMEOUT"] = "0.05"
    _, kc = kernel_with(env)
    run = run_cell(kc, "1+1", timeout=60)
    _, evalue, _ = _error_of(run)
    assert "MODBOX_STARTUP_TIMEOUT" in evalue, evalue
    # The half-made sandbox was destroyed, not leaked.
    assert wait_until(lambda: not (running() - before), timeout=10), running() - before


def _is_idle_of(msg: dict[str, Any], msg_id: str) -> bool:
    return (
        msg["parent_header"].get("msg_id") == msg_id
        and msg["msg_type"] == "status"
        and msg["content"]["execution_state"] == "idle"
    )


def _embedded_services(kernel: Any) -> list[Any]:
    return [c for c in kernel.children() if "modbox_kernel.local" in " ".join(c.cmdline())]


@pytest.mark.timeout(180)
def test_a_dead_embedded_service_is_a_lost_sandbox_and_is_restarted(kernel_with: Any) -> None:
    import psutil
    from kernel_helpers import embedded_env

    km, kc = kernel_with(embedded_env())
    assert run_cell(kc, "x = 1", timeout=120).status == "ok"
    kernel = psutil.Process(km.provisioner.process.pid)
    (service,) = _embedded_services(kernel)

    msg_id = kc.execute("import time\nfor _ in range(600):\n    time.sleep(0.1)")
    time.sleep(1.0)
    service.kill()
    killed_at = time.monotonic()
    while True:
        reply = kc.get_shell_msg(timeout=60)
        if reply["parent_header"].get("msg_id") == msg_id:
            break
    took = time.monotonic() - killed_at
    content = reply["content"]
    while not _is_idle_of(kc.get_iopub_msg(timeout=30), msg_id):
        pass  # the next cell only after this one's idle (see CellRun.done)
    assert content["ename"] == "SandboxLost", content
    assert "embedded Modbox service stopped" in content["evalue"], content["evalue"]
    assert took < 5, f"the cell took {took:.1f} s to end after the service died"

    after = run_cell(kc, "print('x' in dir())", timeout=120)
    assert after.status == "ok", after.describe()
    assert after.stdout == "False\n", after.describe()
    assert "fresh sandbox" in after.stderr, after.describe()
    # A new service serves the new sandbox.
    (replacement,) = _embedded_services(kernel)
    assert replacement.pid != service.pid
