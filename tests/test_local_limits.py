"""Limits of the local service that are not attacks: admission, the --check report,
pip's target, and the files API's bounds.

Admission, ``--check`` and pip run against real services and sandboxes; the files
bounds (entries per listing, files in uploads/, download size, hard links) are driven
in-process against a real directory, because reaching them through a sandbox would
mean creating thousands of files or gigabytes.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import resource
import socket
import subprocess
import sys
import types
import zipfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from service_helpers import (
    LocalSandbox,
    LocalService,
    create_sandbox,
    destroy_sandbox,
    isolation_required,
    running_local_service,
)

from modbox_kernel.local import files
from modbox_kernel.local.envelope import ServiceError

CHECK_TIMEOUT_S = 120


def _create(service: LocalService, key: str | None = None) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key else {}
    with service.client() as control:
        return control.post("/sandboxes", json={}, headers=headers)


def _place(response: httpx.Response) -> tuple[int, int]:
    assert response.status_code == 429, response.text
    (detail,) = response.json()["error"]["details"]
    return detail["queue_position"], detail["queue_length"]


# ---------------------------------------------------------------------- admission


def test_live_sandbox_cap_is_a_429_sentence(tmp_path: Path) -> None:
    with running_local_service(tmp_path / "service.log", "--max-sandboxes", "2") as service:
        first, second = _create(service), _create(service)
        assert first.status_code == second.status_code == 200
        third = _create(service)
        assert third.status_code == 429, third.text
        error = third.json()["error"]
        assert error["code"] == "rate_limited" and error["retryable"] is True
        assert (
            error["message"] == "The host is at capacity: 2 sandboxes running; try again shortly."
        )
        assert error["hint"].startswith("At most 2 sandboxes may run at once.")
        assert third.headers["retry-after"] == "5"
        with service.client() as control:
            control.delete(f"/sandboxes/{first.json()['sandbox_id']}")
        assert _create(service).status_code == 200


def test_memory_budget_caps_admission(tmp_path: Path) -> None:
    with running_local_service(
        tmp_path / "service.log", "--memory-mib", "256", "--max-memory-mib", "600"
    ) as service:
        assert _create(service).status_code == 200
        assert _create(service).status_code == 200  # 2 x 256 MiB fit in 600 MiB
        third = _create(service)
        assert third.status_code == 429, third.text
        error = third.json()["error"]
        assert error["message"].startswith("The host is at capacity: 2 sandboxes running")
        assert "256 MiB" in error["hint"] and "600 MiB" in error["hint"]


def test_at_default_settings_forty_sandboxes_fit_this_host(tmp_path: Path) -> None:
    # Admission counts each sandbox at its memory request (512 MiB), not its 2 GiB
    # limit, against the host's RAM less a reserve: a class of 40 fits a 24 GiB host.
    with open("/proc/meminfo") as f:
        total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    if total < 23 * 2**30:
        pytest.skip(f"this host has {total / 2**30:.1f} GiB; the figure is for 24 GiB hosts")
    with running_local_service(tmp_path / "service.log") as service:
        created = [_create(service) for _ in range(40)]
        assert [r.status_code for r in created] == [200] * 40, created[-1].text
        with service.client() as control:
            info = control.get("/sandboxes/" + created[0].json()["sandbox_id"]).json()
            assert info["status"] in ("provisioning", "running")
            for response in created:
                control.delete(f"/sandboxes/{response.json()['sandbox_id']}")


def test_a_full_host_serves_waiting_creates_first_come_first_served(tmp_path: Path) -> None:
    with running_local_service(tmp_path / "service.log", "--max-sandboxes", "2") as service:
        first, second = _create(service, "a"), _create(service, "b")
        assert first.status_code == second.status_code == 200
        third = _create(service, "c")
        assert _place(third) == (1, 1)
        error = third.json()["error"]
        assert error["message"] == (
            "The host is at capacity: 2 sandboxes running; you are number 1 of 1 in line."
        )
        assert error["hint"].startswith("At most 2 sandboxes may run at once.")
        assert third.headers["retry-after"] == "1"  # a place is kept by asking again soon
        assert _place(_create(service, "d")) == (2, 2)
        assert _place(_create(service, "c")) == (1, 2)  # asking again keeps the place
        assert _create(service).status_code == 429  # no key, no place: others wait
        with service.client() as control:
            control.delete(f"/sandboxes/{first.json()['sandbox_id']}")
        # Room for one: the newer create must not overtake the older one.
        overtaking = _create(service, "d")
        assert _place(overtaking) == (2, 2)
        assert overtaking.json()["error"]["message"] == (
            "Earlier requests wait for a sandbox; you are number 2 of 2 in line."
        )
        assert "1 earlier request waits" in overtaking.json()["error"]["hint"]
        assert _create(service, "c").status_code == 200
        assert _place(_create(service, "d")) == (1, 1)


def _soft_nofile(pid: int) -> tuple[str, str]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return soft, hard
    raise AssertionError("no 'Max open files' line")


def test_a_flood_of_idle_connections_does_not_stop_the_service(tmp_path: Path) -> None:
    # Started as systemd or a login shell would (soft limit 1024), the service lifts
    # its soft limit, so a thousand connections that never send a request (anyone
    # on the host can open them, no token needed) leave room to start a sandbox.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    flood = 1100
    if hard != resource.RLIM_INFINITY and hard < flood + 2048:
        pytest.skip(f"the hard open-files limit here ({hard}) leaves no room for the flood")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        context = running_local_service(tmp_path / "service.log")
        service = context.__enter__()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    sockets: list[socket.socket] = []
    try:
        service_soft, service_hard = _soft_nofile(service.pid)
        assert service_soft == service_hard != "1024", (service_soft, service_hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, flood + 1024), hard))
        address = urlsplit(service.base_url)
        for _ in range(flood):
            sockets.append(socket.create_connection((address.hostname, address.port)))
        sandbox = create_sandbox(service)
        try:
            assert sandbox.exec("echo alive")["stdout"] == "alive\n"
        finally:
            destroy_sandbox(sandbox)
    finally:
        for sock in sockets:
            sock.close()
        context.__exit__(None, None, None)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_place_in_line_lapses_when_its_holder_stops_asking(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from modbox_kernel.local import waitline

    now = [100.0]
    monkeypatch.setattr(waitline, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    line = waitline.WaitLine()
    assert (line.join("gone"), line.join("stays")) == (1, 2)
    now[0] += waitline.PATIENCE_S / 2
    assert line.ahead_of("stays") == 1  # asking again refreshes "stays" only
    now[0] += waitline.PATIENCE_S / 2 + 1
    assert line.ahead_of("stays") == 0 and len(line) == 1


# ------------------------------------------------------------------------ --check


def _check(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modbox_kernel.local", "--check", *args],
        capture_output=True,
        text=True,
        timeout=CHECK_TIMEOUT_S,
        env=env,
    )


def _lines(report: str) -> dict[str, str]:
    """feature -> "in force" | "NOT in force" | "off", from the report's [tag] lines."""
    found = {}
    for line in report.splitlines():
        if line.startswith("  ["):
            tag, _, text = line[3:].partition("] ")
            found[text.split(":", 1)[0]] = tag.strip()
    return found


def test_check_reports_what_is_in_force() -> None:
    done = _check()
    assert done.returncode == 0, done.stderr
    print(done.stdout)  # the report, for the record (pytest -s)
    lines = _lines(done.stdout)
    if "NOT in force" == lines.get("bubblewrap jail") or "NO ISOLATION" in done.stdout:
        if isolation_required():
            pytest.fail(
                f"MODBOX_REQUIRE_ISOLATION=1 but --check found no isolation:\n{done.stdout}"
            )
        pytest.skip("bubblewrap is unusable here; the report says so")
    for feature in (
        "bubblewrap jail",
        "namespaces",
        "nested user namespaces",
        "network",
        "capabilities",
        "open files",
        "file size",
        "/tmp",
        "workspace",
        "admission",
        "sandbox Python",
    ):
        assert lines[feature] == "in force", (feature, done.stdout)
    if os.uname().machine == "x86_64":
        assert lines["seccomp"] == "in force", done.stdout
    if os.geteuid() == 0:
        assert lines["sandbox uid"] == "in force", done.stdout
        assert "64000 on the host, 64000 inside" in done.stdout
        if os.access("/sys/fs/cgroup/memory", os.W_OK):
            assert lines["memory"] == "in force" and lines["processes and threads"] == "in force"
    assert done.stdout.rstrip().splitlines()[-1].startswith("result: sandboxes are isolated")


def test_check_without_usable_bwrap(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MODBOX_REQUIRE_ISOLATION"}
    required = _check(
        "--bwrap", str(tmp_path / "missing"), env={**env, "MODBOX_REQUIRE_ISOLATION": "1"}
    )
    assert required.returncode == 2
    assert _lines(required.stdout)["bubblewrap jail"] == "NOT in force"
    assert "would refuse to start" in required.stdout
    degraded = _check("--bwrap", str(tmp_path / "missing"), env=env)
    assert degraded.returncode == 0, degraded.stderr
    assert _lines(degraded.stdout)["bubblewrap jail"] == "NOT in force"
    assert "result: NO ISOLATION" in degraded.stdout


def test_check_shows_cgroups_that_are_not_writable() -> None:
    if os.geteuid() != 0 or not os.access("/sys/fs/cgroup/memory", os.W_OK):
        pytest.skip("needs root and writable cgroups to take them away")
    # A private mount namespace in which every cgroup hierarchy is read-only.
    script = (
        'for d in /sys/fs/cgroup/*/; do mount -o remount,bind,ro "$d" || exit 99; done; exec "$@"'
    )
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
         sys.executable, "-m", "modbox_kernel.local", "--check"],
        capture_output=True, text=True, timeout=CHECK_TIMEOUT_S,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = _lines(done.stdout)
    assert lines["memory"] == "NOT in force" and lines["processes and threads"] == "NOT in force"
    assert "no memory cgroup" in done.stdout
    assert lines["bubblewrap jail"] == "in force"  # the jail itself still works


# -------------------------------------------------------------------------- pip


def _wheel(name: str, value: str) -> bytes:
    """A minimal pure-Python wheel, built by hand (no network, no build backend)."""
    dist = f"{name}-1.0.dist-info"
    members = {
        f"{name}/__init__.py": f"VALUE = {value!r}\n".encode(),
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }
    record = []
    for path, data in members.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    members[f"{dist}/RECORD"] = ("\n".join([*record, f"{dist}/RECORD,,"]) + "\n").encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path, data in members.items():
            archive.writestr(path, data)
    return buffer.getvalue()


def test_pip_installs_into_the_sandbox_and_imports(fresh_sandbox: LocalSandbox) -> None:
    wheel = _wheel("modbox_pip_probe", "installed")
    uploaded = fresh_sandbox.http.post(
        f"{fresh_sandbox.files_url}/upload",
        files={"file": ("modbox_pip_probe-1.0-py3-none-any.whl", wheel)},
    )
    assert uploaded.status_code == 200, uploaded.text
    install = fresh_sandbox.exec(
        "python3 -m pip install --no-index uploads/modbox_pip_probe-1.0-py3-none-any.whl"
    )
    assert install["exitCode"] == 0, install
    used = fresh_sandbox.exec(
        "python3 -c 'import modbox_pip_probe as m; print(m.VALUE, m.__file__)'"
    )
    value, location = used["stdout"].split()
    assert value == "installed"
    assert location.startswith(f"{fresh_sandbox.exec('echo $HOME')['stdout'].strip()}/.local/")


def test_pip_without_network_fails_quickly_and_clearly(
    fresh_sandbox: LocalSandbox, local_service: LocalService
) -> None:
    if local_service.isolation != "bwrap":
        pytest.skip("without bwrap the sandbox shares the host's network")
    result = fresh_sandbox.exec("python3 -m pip install modbox-no-such-package-xyz", timeout=60)
    assert result["exitCode"] != 0
    assert "No matching distribution found" in result["stdout"] + result["stderr"], result
    assert result["durationMs"] < 15_000, result


# ------------------------------------------------------------------ files bounds


@pytest.fixture
def workspace(tmp_path: Path) -> Iterator[files.Workspace]:
    root = tmp_path / "ws"
    (root / "uploads").mkdir(parents=True)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield files.Workspace(fd, "/workspace")
    finally:
        os.close(fd)


def _root(ws: files.Workspace) -> Path:
    return Path(os.readlink(f"/proc/self/fd/{ws.root_fd}"))


def test_listing_is_bounded(workspace: files.Workspace) -> None:
    for i in range(5):
        (_root(workspace) / f"f{i}").write_text("x")
    listing = files.list_dir(workspace, [], limit=3)
    assert listing["truncated"] is True and listing["total"] == 3
    assert files.list_dir(workspace, [], limit=10)["truncated"] is False


def test_upload_count_is_bounded(workspace: files.Workspace) -> None:
    for name in ("a", "b"):
        files.store_upload(workspace, name, io.BytesIO(b"1"), limit=10, count_limit=2)
    with pytest.raises(ServiceError) as refused:
        files.store_upload(workspace, "c", io.BytesIO(b"1"), limit=10, count_limit=2)
    assert refused.value.status == 409 and "already holds 2 files" in refused.value.message
    # Replacing an existing upload does not add a file.
    assert (
        files.store_upload(workspace, "a", io.BytesIO(b"2"), limit=10, count_limit=2)["size"] == 1
    )


def test_download_refuses_big_files_and_hard_links(workspace: files.Workspace) -> None:
    root = _root(workspace)
    (root / "big").write_bytes(b"x" * 2048)
    with pytest.raises(ServiceError) as big:
        files.open_file(workspace, ["big"], limit=1024)
    assert big.value.status == 409 and "more than the download limit of 1 KiB" in big.value.message
    (root / "mine").write_text("data")
    os.link(root / "mine", root / "alias")
    with pytest.raises(ServiceError) as linked:
        files.open_file(workspace, ["alias"], limit=1024)
    assert linked.value.status == 409 and "2 hard links" in linked.value.message
    os.unlink(root / "alias")
    fd, size = files.open_file(workspace, ["mine"], limit=1024)
    chunks = files.FileChunks(fd)
    assert size == 4 and chunks.read() == b"data" and chunks.read() == b""
    chunks.close()  # already closed at the end: a second close is a no-op
    assert chunks.read() == b""
