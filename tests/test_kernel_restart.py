"""``km.restart_kernel()`` (issue 4): a fresh namespace, a working next cell, no leak.

A restart is a shutdown followed by a new kernel process, so the new kernel provisions
a new sandbox: variables are gone, the next cell works, and the old sandbox is
destroyed. The old process must exit by itself once it has answered
``shutdown_request``; if it does not, jupyter_client SIGTERMs it after half of
``shutdown_wait_time`` (2.5 s) and every restart pays that wait. The test restarts a few
times (each restart is a fresh chance for a shutdown race) and prints the measured
restart times (restart call to the end of the first cell after it), which ``bench/``
measures too.
"""

from __future__ import annotations

import signal
import time

import pytest
from kernel_helpers import (
    KERNEL_NAME,
    env_for_kernel,
    is_modbox,
    list_sandboxes,
    run_cell,
    sandbox_processes,
    start_kernel,
    stop_kernel,
    wait_until,
)

pytestmark = pytest.mark.kernel

RESTARTS = 5
SANDBOX_ID = "import os\nprint(os.environ.get('MODBOX_SANDBOX_ID', 'unset'))"


@pytest.mark.timeout(300)
def test_restart_clears_the_namespace_and_the_next_cell_works(
    request: pytest.FixtureRequest,
) -> None:
    km, kc = start_kernel(KERNEL_NAME, env_for_kernel(request))
    service = request.getfixturevalue("local_service") if is_modbox() else None
    try:
        first = run_cell(kc, SANDBOX_ID, timeout=120)
        assert first.status == "ok", first.describe()
        sandboxes = [first.stdout.strip()]
        exit_codes: list[int | None] = []
        timings: list[str] = []
        for i in range(RESTARTS):
            before = run_cell(kc, f"precious = {i}")
            assert before.status == "ok", before.describe()
            old_process = km.provisioner.process  # type: ignore[union-attr]

            t0 = time.monotonic()
            km.restart_kernel()
            kc.wait_for_ready(timeout=120)
            ready = time.monotonic()
            after = run_cell(kc, f"print('precious' in globals(), {i} * 7)\n{SANDBOX_ID}")
            done = time.monotonic()

            timings.append(f"ready {ready - t0:.2f} s, first cell done {done - t0:.2f} s")
            assert km.provisioner.process is not old_process  # type: ignore[union-attr]
            exit_codes.append(old_process.returncode)
            assert after.status == "ok", after.describe()
            seen, sandbox = after.stdout.splitlines()
            assert seen == f"False {i * 7}", "the namespace survived a restart"
            sandboxes.append(sandbox)

        print("\nrestart times: " + "; ".join(timings))
        again = run_cell(kc, "precious = 1\nprint(precious + 1)")
        assert again.stdout == "2\n", again.describe()
        assert exit_codes == [0] * RESTARTS, (
            f"exit codes of the replaced kernel processes: {exit_codes} "
            f"(-{int(signal.SIGTERM)}: jupyter_client had to SIGTERM a kernel that did not "
            f"exit after answering shutdown_request; -{int(signal.SIGABRT)}: it crashed "
            "while closing its sockets)"
        )

        if service is not None:
            assert "unset" not in sandboxes and len(set(sandboxes)) == len(sandboxes), (
                f"a restarted kernel reused a sandbox: {sandboxes}"
            )
            old = sandboxes[:-1]

            def old_ones_gone() -> bool:
                status = {
                    s["id"]: s["status"] for s in list_sandboxes(service.base_url, service.token)
                }
                return all(status.get(s) == "destroyed" for s in old) and not sandbox_processes(old)

            assert wait_until(old_ones_gone, 10), "an old sandbox outlived its kernel's restart"
    finally:
        stop_kernel(km, kc)
