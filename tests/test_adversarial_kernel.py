"""Hostile cells under ``modbox-python``: each ends with a readable error, then ``1+1`` runs.

The kernel runs against a dedicated local service with tight limits (512 MiB, 128
processes), as a course server would configure it. Per cell, the test checks what the
user sees (the reply and the error output) and what the service recorded as the cause
of a lost sandbox (``GET /sandboxes/{id}`` → ``error``), then that the kernel runs
``1+1`` in a fresh sandbox.

The kernel's lost-sandbox message carries the service's cause; both are asserted.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from kernel_helpers import KERNEL_NAME, Kernels, is_modbox, run_cell, service_env
from service_helpers import (
    LocalService,
    host_pids_of,
    processes_of_uid,
    require_bwrap,
    running_local_service,
)

pytestmark = [
    pytest.mark.isolation,
    pytest.mark.kernel,
    pytest.mark.skipif(not is_modbox(), reason=f"{KERNEL_NAME} runs no sandboxes"),
]

MEMORY_MIB = 512
PIDS = 128
SANDBOX_UID = 64126


@pytest.fixture(scope="module")
def tight_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalService]:
    with running_local_service(
        tmp_path_factory.mktemp("hostile-cells") / "service.log",
        "--memory-mib", str(MEMORY_MIB),
        "--pids", str(PIDS),
        "--sandbox-uid", str(SANDBOX_UID),
    ) as service:  # fmt: skip
        require_bwrap(service, "these limits need bubblewrap and cgroups")
        yield service


@pytest.fixture(scope="module")
def kc(tight_service: LocalService, kernels: Kernels) -> BlockingKernelClient:
    # The warm-up cell runs in the sandbox the first hostile cell then uses, so the
    # counts of lost sandboxes in the last test are not changed by it.
    return kernels.start(service_env(tight_service.base_url, tight_service.token)).kc


def _errors(run: Any) -> list[dict[str, Any]]:
    return [m["content"] for m in run.outputs if m["msg_type"] == "error"]


def _newest_destroyed(service: LocalService) -> dict[str, Any]:
    with service.client() as control:
        listed = control.get("/sandboxes", params={"status": "destroyed"}).json()["sandboxes"]
        assert listed, "no sandbox was destroyed"
        detail: dict[str, Any] = control.get(f"/sandboxes/{listed[0]['id']}").json()
    return detail


def _then_one_plus_one(kc: BlockingKernelClient) -> None:
    run = run_cell(kc, "1+1", timeout=120)
    assert run.status == "ok", run.describe()
    results = [m for m in run.outputs if m["msg_type"] == "execute_result"]
    assert results and results[0]["content"]["data"]["text/plain"] == "2", run.describe()


def _assert_lost_sandbox(run: Any, *causes: str) -> None:
    """The user's view of a lost sandbox: a SandboxLost error that says so and why."""
    assert run.status == "error", run.describe()
    (error,) = _errors(run)
    assert error["ename"] == "SandboxLost", run.describe()
    assert "sandbox" in error["evalue"] and "fresh sandbox" in error["evalue"], run.describe()
    if causes:
        assert any(c in error["evalue"] for c in causes), run.describe()


def test_huge_allocation_is_a_memory_error(kc: BlockingKernelClient) -> None:
    run = run_cell(kc, "x = bytearray(10**11)", timeout=120)
    assert run.status == "error", run.describe()
    assert [e["ename"] for e in _errors(run)] == ["MemoryError"], run.describe()
    _then_one_plus_one(kc)


def test_filling_memory_loses_the_sandbox_and_the_service_names_the_cause(
    kc: BlockingKernelClient, tight_service: LocalService
) -> None:
    run = run_cell(kc, "b = [bytearray(10**6) for _ in range(10**4)]", timeout=120)
    _assert_lost_sandbox(run, f"out of memory (limit {MEMORY_MIB} MiB)")
    detail = _newest_destroyed(tight_service)
    assert detail["error"] == f"out of memory (limit {MEMORY_MIB} MiB)", detail
    _then_one_plus_one(kc)


def test_fork_bomb_ends_with_its_cause(
    kc: BlockingKernelClient, tight_service: LocalService
) -> None:
    process_limit = f"process limit ({PIDS} processes and threads"
    run = run_cell(kc, "import os\nwhile True:\n    os.fork()", timeout=120)
    assert run.status == "error", run.describe()
    if [e["ename"] for e in _errors(run)] == ["BlockingIOError"]:
        # The agent answered before its copies filled the sandbox: Python's own words.
        assert "Resource temporarily unavailable" in _errors(run)[0]["evalue"]
        # The copies (each waits for a next cell) may still hold every process slot,
        # so the next command cannot start: the service ends the sandbox, saying so.
        run = run_cell(kc, "1+1", timeout=120)
        if run.status == "error":
            _assert_lost_sandbox(run, f"process limit reached ({PIDS}")
            cause = _newest_destroyed(tight_service)["error"]
            assert cause.startswith(f"process limit reached ({PIDS}"), cause
    else:
        # Usually: the copies exhausted memory on their way out, or no command could
        # start any more; either way the service ended the sandbox and says why.
        out_of_memory = f"out of memory (limit {MEMORY_MIB} MiB)"
        _assert_lost_sandbox(run, process_limit, f"process limit reached ({PIDS}", out_of_memory)
        cause = _newest_destroyed(tight_service)["error"]
        assert (
            process_limit in cause
            or cause.startswith(f"process limit reached ({PIDS}")
            or out_of_memory in cause
        ), cause
    _then_one_plus_one(kc)


def test_killing_every_process_ends_with_its_cause(
    kc: BlockingKernelClient, tight_service: LocalService
) -> None:
    run = run_cell(kc, "import os\nos.kill(-1, 9)", timeout=120)
    _assert_lost_sandbox(run, "killed with SIGKILL (signal 9)")
    cause = _newest_destroyed(tight_service)["error"]
    assert "killed with SIGKILL (signal 9)" in cause and "os.kill(-1, 9)" in cause, cause
    _then_one_plus_one(kc)


def test_the_service_kept_no_process_of_the_lost_sandboxes(tight_service: LocalService) -> None:
    with tight_service.client() as control:
        sandboxes = control.get("/sandboxes").json()["sandboxes"]
    live = [s["id"] for s in sandboxes if s["status"] != "destroyed"]
    assert len(live) <= 1, live  # the kernel's current sandbox
    assert len(sandboxes) - len(live) >= 3
    if os.geteuid() == 0:
        # Only the live sandbox's processes may run as the sandbox uid (orphaned
        # zombies of the lost ones are reaped within the service's reaper interval).
        deadline = time.monotonic() + 2
        while True:
            allowed = set().union(*(host_pids_of(sandbox_id) for sandbox_id in live))
            stray = processes_of_uid(SANDBOX_UID) - allowed
            if not stray or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert stray == set()
