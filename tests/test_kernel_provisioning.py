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
