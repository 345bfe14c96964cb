"""The service as a program: startup line, flags, env vars, shutdown, parent death, TTL.

Each test starts its own ``python -m modbox_kernel.local`` (about half a second each),
because what is under test is how the process starts and ends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from service_helpers import (
    LocalService,
    create_sandbox,
    destroy_sandbox,
    host_pids_of,
    start_local_service,
    stop_local_service_process,
    wait_until,
)


def _start(tmp_path: Path, *args: str, **env: str) -> LocalService:
    return start_local_service(tmp_path / "service.log", *args, env={**os.environ, **env})


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_startup_line_is_the_only_stdout_and_token_stays_out_of_logs(tmp_path: Path) -> None:
    service = _start(tmp_path)
    try:
        assert service.base_url.startswith("http://127.0.0.1:")
        assert len(service.token) >= 32
        assert service.isolation in ("bwrap", "none")
        health = httpx.get(f"{service.base_url}/health").json()
        assert health["isolation"] == service.isolation
    finally:
        stop_local_service_process(service.process)
    log = service.log_text()
    assert service.token not in log
    assert "listening on" in log


def test_startup_line_fields_and_flushing(tmp_path: Path) -> None:
    # Read the raw line ourselves: exactly one JSON object with the documented keys.
    process = subprocess.Popen(
        [sys.executable, "-m", "modbox_kernel.local", "--port", "0", "--token", "fixed-token"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        line = json.loads(process.stdout.readline())
        assert set(line) == {"base_url", "token", "pid", "isolation"}
        assert line["pid"] == process.pid and line["token"] == "fixed-token"
        listed = httpx.get(
            f"{line['base_url']}/sandboxes", headers={"Authorization": "Bearer fixed-token"}
        )
        assert listed.status_code == 200
        process.send_signal(signal.SIGTERM)
        rest = process.stdout.read()
        assert rest == b""
    finally:
        stop_local_service_process(process)


def test_token_from_environment(tmp_path: Path) -> None:
    service = _start(tmp_path, MODBOX_LOCAL_TOKEN="env-token-123")
    try:
        assert service.token == "env-token-123"
    finally:
        stop_local_service_process(service.process)


def test_required_isolation_refuses_none_with_a_sentence(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "modbox_kernel.local", "--isolation", "none"],
        env={**os.environ, "MODBOX_REQUIRE_ISOLATION": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert "MODBOX_REQUIRE_ISOLATION=1" in done.stderr
    assert "cannot start" in done.stderr


def test_required_isolation_without_usable_bwrap_fails(tmp_path: Path) -> None:
    # PATH without bwrap (but with prlimit and the Python we run on).
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    for tool in ("prlimit", "sh"):
        found = subprocess.run(["which", tool], capture_output=True, text=True).stdout.strip()
        (fake_bin / tool).symlink_to(found)
    done = subprocess.run(
        [sys.executable, "-m", "modbox_kernel.local", "--port", "0"],
        env={**os.environ, "MODBOX_REQUIRE_ISOLATION": "1", "PATH": str(fake_bin)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "bwrap executable was not found" in done.stderr
    assert done.stdout == ""


def test_none_mode_works_and_says_so(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MODBOX_REQUIRE_ISOLATION"}
    service = start_local_service(
        tmp_path / "service.log", "--isolation", "none", "--state-dir", str(tmp_path / "state"),
        env=env,
    )  # fmt: skip
    try:
        assert service.isolation == "none"
        assert "NO ISOLATION" in service.log_text() or "ISOLATION DISABLED" in service.log_text()
        sandbox = create_sandbox(service)
        result = sandbox.exec('pwd; echo "$HOME"; nohup sleep 300 >/dev/null 2>&1 &')
        cwd, home = result["stdout"].splitlines()
        assert cwd == home and cwd.startswith(str(tmp_path / "state"))
        sandbox.exec("setsid sleep 301 >/dev/null 2>&1 < /dev/null &")
        # The supervisor and both sleeps. The exec answers as soon as bash exits, which
        # can be before its background child has finished exec'ing setsid (mid-execve,
        # /proc/<pid>/environ reads empty), so wait for it rather than race it.
        assert wait_until(lambda: len(host_pids_of(sandbox.id)) >= 3, 10), host_pids_of(sandbox.id)
        destroy_sandbox(sandbox)
        assert host_pids_of(sandbox.id) == set()
        assert not Path(cwd).exists()
    finally:
        stop_local_service_process(service.process)
    assert (tmp_path / "state").is_dir()  # an explicit --state-dir is kept


def test_sigterm_destroys_sandboxes_and_removes_the_temp_state_dir(tmp_path: Path) -> None:
    service = _start(tmp_path)
    sandbox = create_sandbox(service)
    sandbox.exec("nohup sleep 300 >/dev/null 2>&1 &")
    state_line = next(line for line in service.log_text().splitlines() if "state dir " in line)
    state_dir = Path(state_line.split("state dir ", 1)[1].split(";", 1)[0])
    assert state_dir.is_dir()
    stop_local_service_process(service.process)
    assert host_pids_of(sandbox.id) == set()
    assert not state_dir.exists()
    sandbox.close()


def test_exit_with_parent(tmp_path: Path) -> None:
    # A parent that starts the service and exits right after reading its line.
    launcher = (
        "import subprocess, sys\n"
        "p = subprocess.Popen([sys.executable, '-m', 'modbox_kernel.local', '--port', '0',"
        " '--exit-with-parent'], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)\n"
        "sys.stdout.write(p.stdout.readline().decode()); sys.stdout.flush()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", launcher], capture_output=True, text=True, timeout=60
    )
    info = json.loads(done.stdout)
    pid = info["pid"]
    token = info["token"]
    try:
        # The parent is gone already; the service notices within its poll interval.
        assert wait_until(lambda: _gone(pid), 10), "service outlived its parent"
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{info['base_url']}/health", timeout=2)
    finally:
        if not _gone(pid):
            os.kill(pid, signal.SIGKILL)
    assert token


def test_ttl_reaper_destroys_expired_sandboxes(tmp_path: Path) -> None:
    service = _start(tmp_path, "--min-ttl", "1")
    try:
        sandbox = create_sandbox(service, ttl_seconds=1)
        sandbox.exec("nohup sleep 300 >/dev/null 2>&1 &")
        with service.client() as control:

            def expired() -> bool:
                return control.get(f"/sandboxes/{sandbox.id}").json()["status"] == "destroyed"

            assert wait_until(expired, 10)
            detail = control.get(f"/sandboxes/{sandbox.id}").json()
        assert detail["error"] == "ttl expired"
        assert host_pids_of(sandbox.id) == set()
        sandbox.close()
    finally:
        stop_local_service_process(service.process)
