"""Kernels that die without a shutdown leave no sandbox behind on a shared service.

Against real local services and real kernels. A kernel on a shared service renews its
sandbox's lease while it lives (the service advertises leases; ``--lease-seconds 3``
here, 50 by default): a SIGKILLed kernel, and a kernel whose parent process died
(ipykernel's parent poller exits without cleanup), must each leave no live sandbox
after 60 s. Where the service has no leases (``--lease-seconds 0``, as with a service
that does not offer them), the kernel's record of its sandboxes lets
``python -m modbox_kernel cleanup`` and the next kernel's start destroy a dead kernel's
sandbox, and never another user's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from kernel_helpers import KERNEL_NAME, run_cell, service_env, start_kernel, stop_kernel
from service_helpers import LocalService, running_local_service, wait_until

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(180)]

SANDBOX_ID_CELL = "import os\nprint(os.environ['MODBOX_SANDBOX_ID'])"


@pytest.fixture(scope="module")
def leasing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalService]:
    log = Path(tmp_path_factory.mktemp("leasing")) / "service.log"
    with running_local_service(log, "--lease-seconds", "3") as service:
        yield service


@pytest.fixture(scope="module")
def no_leases(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalService]:
    log = Path(tmp_path_factory.mktemp("no-leases")) / "service.log"
    with running_local_service(log, "--lease-seconds", "0") as service:
        yield service


def _status(service: LocalService, sandbox_id: str) -> dict[str, object]:
    with service.client() as control:
        answer: dict[str, object] = control.get(f"/sandboxes/{sandbox_id}").json()
        return answer


def _destroyed_within(service: LocalService, sandbox_id: str, seconds: float) -> bool:
    return wait_until(lambda: _status(service, sandbox_id)["status"] == "destroyed", seconds)


def _env(service: LocalService, state: Path) -> dict[str, str]:
    return {**service_env(service.base_url, service.token), "XDG_STATE_HOME": str(state)}


def test_a_sigkilled_kernels_lease_lapses(leasing: LocalService, tmp_path: Path) -> None:
    km, kc = start_kernel(KERNEL_NAME, _env(leasing, tmp_path))
    try:
        run = run_cell(kc, SANDBOX_ID_CELL)
        assert run.status == "ok", run.describe()
        sandbox_id = run.stdout.strip()
        assert _status(leasing, sandbox_id)["status"] == "running"
        os.kill(km.provisioner.pid, signal.SIGKILL)  # type: ignore[union-attr]
        assert _destroyed_within(leasing, sandbox_id, 60)
        assert "lease lapsed" in str(_status(leasing, sandbox_id).get("error"))
    finally:
        kc.stop_channels()
        km.cleanup_resources()


PARENT = textwrap.dedent(
    """
    import json, sys, time
    from jupyter_client.manager import start_new_kernel
    km, kc = start_new_kernel(kernel_name=sys.argv[1], env=json.loads(sys.argv[2]))
    msg_id = kc.execute("import os\\nprint(os.environ['MODBOX_SANDBOX_ID'])")
    while True:
        msg = kc.get_iopub_msg(timeout=60)
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream":
            break
    print(json.dumps({"sandbox": msg["content"]["text"].strip(),
                      "kernel": km.provisioner.pid}), flush=True)
    time.sleep(600)
    """
)


def test_a_kernel_whose_parent_died_leaves_no_sandbox(
    leasing: LocalService, tmp_path: Path
) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, KERNEL_NAME, json.dumps(_env(leasing, tmp_path))],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        started = json.loads(parent.stdout.readline())
        assert _status(leasing, started["sandbox"])["status"] == "running"
        parent.kill()  # the kernel's parent dies; the kernel is not told
        parent.wait()
        assert _destroyed_within(leasing, started["sandbox"], 60)
        # And the kernel itself went away (ipykernel's parent poller).
        assert wait_until(lambda: not _alive(started["kernel"]), 30)
    finally:
        if parent.poll() is None:
            parent.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _cleanup(service: LocalService, state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modbox_kernel", "cleanup", *args],
        env=_env(service, state),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _killed_kernel_sandbox(service: LocalService, state: Path) -> str:
    km, kc = start_kernel(KERNEL_NAME, _env(service, state))
    try:
        run = run_cell(kc, SANDBOX_ID_CELL)
        assert run.status == "ok", run.describe()
        os.kill(km.provisioner.pid, signal.SIGKILL)  # type: ignore[union-attr]
        assert wait_until(lambda: not km.is_alive(), 10)
    finally:
        kc.stop_channels()
        km.cleanup_resources()
    return run.stdout.strip()


def test_cleanup_destroys_a_dead_kernels_sandbox_and_no_other_users(
    no_leases: LocalService, tmp_path: Path
) -> None:
    alice, bob = tmp_path / "alice-state", tmp_path / "bob-state"
    alices = _killed_kernel_sandbox(no_leases, alice)
    bobs = _killed_kernel_sandbox(no_leases, bob)
    # Without a lease nothing ends them (until the TTL).
    assert _status(no_leases, alices)["status"] == _status(no_leases, bobs)["status"] == "running"

    listed = _cleanup(no_leases, alice)
    assert listed.returncode == 0, listed.stderr
    assert f"would destroy sandbox {alices}" in listed.stdout and bobs not in listed.stdout
    assert no_leases.token not in listed.stdout + listed.stderr
    assert _status(no_leases, alices)["status"] == "running"  # a dry run by default

    done = _cleanup(no_leases, alice, "--yes")
    assert done.returncode == 0, done.stderr
    assert f"destroyed sandbox {alices}" in done.stdout
    assert _status(no_leases, alices)["status"] == "destroyed"
    assert _status(no_leases, bobs)["status"] == "running"  # another user's: untouched
    assert "No sandboxes of dead kernels" in _cleanup(no_leases, alice).stdout

    # Bob's next kernel cleans up after his dead one when it starts.
    km, kc = start_kernel(KERNEL_NAME, _env(no_leases, bob))
    try:
        assert run_cell(kc, "1").status == "ok"
        assert _destroyed_within(no_leases, bobs, 30)
    finally:
        stop_kernel(km, kc)
    assert list((bob / "modbox-kernel" / "sandboxes").glob("*.json")) == []
