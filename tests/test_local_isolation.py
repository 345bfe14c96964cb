"""Escape attempts against a real bubblewrap sandbox (the "L" cases of docs/isolation.md).

Each test runs code inside a sandbox of the real service and checks, from the host,
that it could not reach what it should not. They need bwrap: with
``MODBOX_REQUIRE_ISOLATION=1`` (CI) a missing bwrap fails them, elsewhere they skip
with the reason. A second service, started with a canary secret in its environment and
a small memory limit, serves the tests that need their own service (and the SIGKILL
test, which kills it).
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from service_helpers import (
    LocalSandbox,
    LocalService,
    create_sandbox,
    host_pids_of,
    require_bwrap,
    running_local_service,
    running_sandbox,
)

pytestmark = [pytest.mark.isolation, pytest.mark.usefixtures("require_isolation")]

CANARY_ENV = "MODBOX_TEST_CANARY_SECRET"
SMALL_MEMORY_MIB = 256
# A host file outside the read-only set: this checkout's own pyproject.toml, wherever it is.
REPO_PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


@pytest.fixture(scope="module")
def canary_service(tmp_path_factory: pytest.TempPathFactory, canary: str) -> Iterator[LocalService]:
    env = {**os.environ, CANARY_ENV: canary, "MODBOX_LOCAL_TOKEN": f"tok-{canary}"}
    log = tmp_path_factory.mktemp("canary-service") / "service.log"
    with running_local_service(log, "--memory-mib", str(SMALL_MEMORY_MIB), env=env) as service:
        require_bwrap(service, "the canary tests need bubblewrap")
        yield service


def test_no_route_to_host_loopback_but_own_loopback_works(
    local_sandbox: LocalSandbox, local_service: LocalService
) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    try:
        host_port = listener.getsockname()[1]
        service_port = int(local_service.base_url.rsplit(":", 1)[1])
        probe = (
            "import socket, sys\n"
            "for port in map(int, sys.argv[1:]):\n"
            "    try:\n"
            "        socket.create_connection(('127.0.0.1', port), timeout=2).close()\n"
            "        print(port, 'connected')\n"
            "    except OSError as e:\n"
            "        print(port, 'refused', type(e).__name__)\n"
            "srv = socket.socket(); srv.bind(('127.0.0.1', 0)); srv.listen()\n"
            "socket.create_connection(srv.getsockname(), timeout=2).close()\n"
            "print('own loopback ok')\n"
        )
        local_sandbox.exec(f"cat > probe.py <<'EOF'\n{probe}EOF")
        result = local_sandbox.exec(f"python3 probe.py {host_port} {service_port}")
        lines = result["stdout"].splitlines()
        assert lines[0].startswith(f"{host_port} refused"), result
        assert lines[1].startswith(f"{service_port} refused"), result
        assert lines[2] == "own loopback ok"
        external = local_sandbox.exec(
            "python3 -c \"import socket; socket.create_connection(('1.1.1.1', 53), timeout=2)\""
        )
        assert external["exitCode"] != 0
    finally:
        listener.close()


def test_host_files_outside_the_read_only_set_are_invisible(local_sandbox: LocalSandbox) -> None:
    assert REPO_PYPROJECT.is_file(), REPO_PYPROJECT
    canary = Path.home() / f"modbox-canary-{uuid.uuid4().hex}"
    canary.write_text("host secret")
    try:
        result = local_sandbox.exec(
            f"test -e {canary} && echo visible || echo invisible; "
            f"ls {Path.home()} 2>/dev/null | grep -c modbox-canary || true; "
            f"cat /etc/shadow >/dev/null 2>&1 && echo shadow || echo no-shadow; "
            f"test -e {shlex.quote(str(REPO_PYPROJECT))} && echo repo || echo no-repo"
        )
        assert result["stdout"].split() == ["invisible", "0", "no-shadow", "no-repo"]
    finally:
        canary.unlink()


def test_system_and_python_are_read_only(local_sandbox: LocalSandbox) -> None:
    result = local_sandbox.exec(
        "for p in /usr/modbox-x /etc/modbox-x \"$(python3 -c 'import sys; print(sys.prefix)')\"/x"
        " /opt/modbox/supervisor.py; do"
        ' (echo x > "$p") 2>/dev/null && echo "wrote $p" || echo denied; done'
    )
    assert result["stdout"].split() == ["denied"] * 4, result


def test_no_capabilities_no_new_privileges_no_nested_userns(local_sandbox: LocalSandbox) -> None:
    status = local_sandbox.exec("grep -E '^(CapEff|CapPrm|CapBnd|NoNewPrivs):' /proc/self/status")
    fields = dict(line.split(":\t") for line in status["stdout"].splitlines())
    assert fields["CapEff"].strip() == "0000000000000000"
    assert fields["CapPrm"].strip() == "0000000000000000"
    assert fields["CapBnd"].strip() == "0000000000000000"
    assert fields["NoNewPrivs"].strip() == "1"
    nested = local_sandbox.exec("unshare -U true")
    assert nested["exitCode"] != 0
    mount = local_sandbox.exec("mount -t tmpfs none /tmp")
    assert mount["exitCode"] != 0
    assert local_sandbox.exec("hostname")["stdout"] == "modbox\n"


def test_proc_lists_only_the_sandbox_processes(
    local_sandbox: LocalSandbox, local_service: LocalService
) -> None:
    result = local_sandbox.exec(
        "for d in /proc/[0-9]*; do tr '\\0' ' ' < $d/cmdline 2>/dev/null; echo; done"
    )
    cmdlines = [line for line in result["stdout"].splitlines() if line.strip()]
    assert 2 <= len(cmdlines) < 20, cmdlines
    assert not any("modbox_kernel.local" in c for c in cmdlines), cmdlines
    assert not any("pytest" in c for c in cmdlines), cmdlines
    assert str(local_service.pid) not in local_sandbox.exec("ls /proc")["stdout"].split()


def test_tmp_is_private_to_each_sandbox(local_service: LocalService) -> None:
    with running_sandbox(local_service) as first, running_sandbox(local_service) as second:
        first.exec("echo mine > /tmp/private && echo mine > /dev/shm/private")
        check = second.exec("cat /tmp/private /dev/shm/private 2>&1")
        assert "mine" not in check["stdout"]
        assert first.exec("cat /tmp/private")["stdout"] == "mine\n"


def test_service_environment_is_invisible_inside(canary_service: LocalService, canary: str) -> None:
    with running_sandbox(canary_service) as sandbox:
        result = sandbox.exec(
            f"env; cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n'; "
            f"grep -rl {canary} /proc/[0-9]*/environ /proc/[0-9]*/cmdline 2>/dev/null; true"
        )
        assert canary not in result["stdout"]
        assert CANARY_ENV not in result["stdout"]
        assert "MODBOX_LOCAL_TOKEN" not in result["stdout"]


def test_memory_limit_is_enforced_when_cgroups_are_writable(canary_service: LocalService) -> None:
    health = httpx.get(f"{canary_service.base_url}/health").json()
    if "memory" not in health["limits"]:
        pytest.skip(f"no writable memory cgroup on this host ({health['limits']})")
    with running_sandbox(canary_service) as sandbox:
        # Touched pages, so the cgroup (not an early MemoryError) must stop it. An OOM
        # kill ends the whole sandbox, and the answer says why.
        hog = sandbox.http.post(
            sandbox.exec_url,
            json={"command": f"python3 -c 'b = bytearray({3 * SMALL_MEMORY_MIB} << 20)'"},
        )
        assert hog.status_code == 404, hog.text
        message = hog.json()["error"]["message"]
        assert message.endswith(f"was destroyed: out of memory (limit {SMALL_MEMORY_MIB} MiB).")
        with canary_service.client() as control:
            detail = control.get(f"/sandboxes/{sandbox.id}").json()
            # DELETE answers once the (already running) teardown has finished.
            assert control.delete(f"/sandboxes/{sandbox.id}").json() == {"success": True}
        assert detail["status"] == "destroyed"
        assert detail["error"] == f"out of memory (limit {SMALL_MEMORY_MIB} MiB)"
        assert host_pids_of(sandbox.id) == set()


def test_sigkill_of_the_service_leaves_no_sandbox_process(
    canary_service: LocalService, tmp_path: Path
) -> None:
    # Runs last in this module: it kills the module's service.
    sandboxes = [create_sandbox(canary_service) for _ in range(2)]
    for sandbox in sandboxes:
        sandbox.exec("nohup sleep 300 >/dev/null 2>&1 & setsid sleep 301 >/dev/null 2>&1 &")
    ids = [s.id for s in sandboxes]
    assert all(len(host_pids_of(i)) >= 3 for i in ids)

    log_lines = canary_service.log_text().splitlines()
    state_line = next(line for line in log_lines if "state dir " in line)
    state_dir = Path(state_line.split("state dir ", 1)[1].split(";", 1)[0])
    assert state_dir.is_dir()

    os.kill(canary_service.pid, signal.SIGKILL)
    canary_service.process.wait(10)
    time.sleep(2)
    leftovers = {i: host_pids_of(i) for i in ids}
    assert leftovers == {i: set() for i in ids}
    for sandbox in sandboxes:
        sandbox.close()

    # The next start removes what the killed service could not: its temp state dir
    # (workspaces included) and its sandboxes' cgroups.
    with running_local_service(tmp_path / "successor.log"):
        assert not state_dir.exists()
        stale_cgroups = list(Path("/sys/fs/cgroup").rglob(f"modbox-{canary_service.pid}-*"))
        assert stale_cgroups == []
