"""Per-cell time limits and sandbox TTLs, as the user meets them in a real kernel.

* ``%%modbox_timeout N`` (a first line the kernel consumes) and the ``cell_timeout``
  trait (env ``MODBOX_CELL_TIMEOUT``): at the limit the cell is interrupted; if it
  ignores the interrupt, the sandbox's Python is restarted. Either way the error names
  the limit and the settings.
* TTL: a warning before expiry, then the next cell runs in a fresh sandbox with a
  notice instead of failing when the service's reaper destroys the old one.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from faultproxy import Fault, FaultProxy, Request
from kernel_helpers import (
    Kernel,
    Kernels,
    list_sandboxes,
    only_modbox,
    run_cell,
    service_env,
    start_kernel,
    stop_kernel,
    wait_until,
)
from service_helpers import LocalService, start_local_service, stop_local_service_process

pytestmark = [pytest.mark.kernel, only_modbox("time limits and TTLs are modbox-python's")]

TTL = 8


def _error(run: Any) -> dict[str, Any]:
    """The error reply; the cell's one error output must name the same exception."""
    assert run.status == "error", run.describe()
    reply = dict(run.reply["content"])
    shown = [m["content"] for m in run.outputs if m["msg_type"] == "error"]
    assert [(e["ename"], e["evalue"]) for e in shown] == [(reply["ename"], reply["evalue"])], (
        run.describe()
    )
    return reply


@pytest.fixture(scope="module")
def limited(local_service: LocalService, kernels: Kernels) -> Kernel:
    env = {**service_env(local_service.base_url, local_service.token), "MODBOX_CELL_TIMEOUT": "2"}
    return kernels.start(env, kernel_name="modbox-python")


@pytest.mark.timeout(120)
def test_the_cell_magic_sets_a_limit_that_interrupts(limited: Kernel) -> None:
    assert run_cell(limited.kc, "kept = 41").status == "ok"
    t0 = time.monotonic()
    run = run_cell(limited.kc, "%%modbox_timeout 0.5\nimport time\ntime.sleep(30)")
    took = time.monotonic() - t0
    reply = _error(run)
    assert reply["ename"] == "CellTimeoutError", run.describe()
    assert "time limit of 0.5 s" in reply["evalue"], reply["evalue"]
    assert "MODBOX_CELL_TIMEOUT" in reply["evalue"] and "%%modbox_timeout" in reply["evalue"]
    assert took < 5, f"the limit took {took:.1f} s to act"
    # An interrupt, not a restart: the namespace survives.
    after = run_cell(limited.kc, "print(kept + 1)")
    assert after.status == "ok" and after.stdout == "42\n", after.describe()


@pytest.mark.timeout(120)
def test_the_trait_limit_escalates_when_the_cell_ignores_the_interrupt(limited: Kernel) -> None:
    assert run_cell(limited.kc, "lost_soon = 1").status == "ok"
    code = (
        "import time\nwhile True:\n    try:\n        time.sleep(1)\n"
        "    except KeyboardInterrupt:\n        pass"
    )
    t0 = time.monotonic()
    run = run_cell(limited.kc, code, timeout=60)
    took = time.monotonic() - t0
    reply = _error(run)
    assert reply["ename"] == "CellTimeoutError", run.describe()
    assert "time limit of 2 s" in reply["evalue"] and "restarted" in reply["evalue"]
    assert took < 10, f"escalation took {took:.1f} s"
    after = run_cell(limited.kc, "print('lost_soon' in dir())")
    assert after.status == "ok" and after.stdout == "False\n", after.describe()


@pytest.mark.timeout(120)
def test_a_cell_within_its_limit_is_untouched(limited: Kernel) -> None:
    run = run_cell(limited.kc, "%%modbox_timeout 10\nimport time\ntime.sleep(0.3)\nprint('done')")
    assert run.status == "ok" and run.stdout == "done\n", run.describe()


@pytest.mark.timeout(120)
def test_a_limit_that_runs_out_while_waiting_for_the_sandbox_names_the_limit(
    tmp_path: Path,
) -> None:
    # The service's answer to every create is held back, so the kernel is still
    # provisioning when the cell's limit runs out. (A service of its own: the create
    # did reach it, and stopping it takes down whatever it made.)
    def hold_creates(request: Request) -> Fault | None:
        creating = request.method == "POST" and request.path.rstrip("/").endswith("/sandboxes")
        return Fault("stall", seconds=20) if creating else None

    service = start_local_service(tmp_path / "service.log")
    try:
        with FaultProxy() as proxy:
            parts = urlsplit(service.base_url)
            assert parts.hostname is not None and parts.port is not None
            proxy.upstream = (parts.hostname, parts.port)
            proxy.decide = hold_creates
            km, kc = start_kernel("modbox-python", service_env(proxy.url, service.token))
            try:
                t0 = time.monotonic()
                run = run_cell(kc, "%%modbox_timeout 1\n1+1", timeout=60)
                took = time.monotonic() - t0
                reply = _error(run)
                assert reply["ename"] == "CellTimeoutError", run.describe()
                assert "time limit of 1 s" in reply["evalue"], reply["evalue"]
                assert took < 10, f"the limit took {took:.1f} s to act"
                assert proxy.injected["stall"] >= 1, "no create was held: this tested nothing"
            finally:
                stop_kernel(km, kc)
    finally:
        stop_local_service_process(service.process)


@pytest.fixture(scope="module")
def short_ttl_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalService]:
    log = Path(tmp_path_factory.mktemp("ttl")) / "service.log"
    service = start_local_service(log, "--min-ttl", "1")
    yield service
    stop_local_service_process(service.process)


@pytest.mark.timeout(120)
def test_a_sandbox_near_its_ttl_is_announced_then_replaced(
    short_ttl_service: LocalService,
) -> None:
    base, token = short_ttl_service.base_url, short_ttl_service.token
    env = service_env(base, token)
    env["MODBOX_TTL_SECONDS"] = str(TTL)
    km, kc = start_kernel("modbox-python", env)
    try:
        first = run_cell(kc, "x = 1\nopen('f.txt', 'w').write('kept?')", timeout=60)
        assert first.status == "ok", first.describe()
        # A short TTL is "about to run out" at once: one warning, naming the setting.
        assert "reaches its time limit" in first.stderr, first.describe()
        assert "MODBOX_TTL_SECONDS" in first.stderr
        again = run_cell(kc, "1")
        assert "reaches its time limit" not in again.stderr, "the warning repeats"
        (old,) = [s["id"] for s in list_sandboxes(base, token, status="running")]

        # Past the replacement point; the service's reaper may or may not have struck
        # yet. Either way the cell must run in a fresh sandbox, with a notice.
        time.sleep(TTL)
        # f.txt came back to the notebook's folder after the first cell, so the fresh
        # sandbox has it again; the variable is gone.
        run = run_cell(kc, "import os\nprint('x' in dir(), os.path.exists('f.txt'))")
        assert run.status == "ok", run.describe()
        assert run.stdout == "False True\n", run.describe()
        assert "reached its time limit (TTL 8 s)" in run.stderr, run.describe()
        assert "fresh sandbox" in run.stderr

        # The old sandbox is gone and exactly one new one runs.
        def replaced(old: str = old) -> bool:
            return [s["id"] for s in list_sandboxes(base, token, status="running")] != [old]

        assert wait_until(replaced, timeout=10)
        running = [s["id"] for s in list_sandboxes(base, token, status="running")]
        assert len(running) == 1 and old not in running, running
    finally:
        stop_kernel(km, kc)
