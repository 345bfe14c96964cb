"""Shared fixtures: the real embedded Modbox service, started once per test session.

``local_service`` starts ``python -m modbox_kernel.local --port 0 --exit-with-parent``
as a subprocess, reads its one-line JSON startup announcement and yields a
:class:`LocalService` (``base_url``, ``token``, ``process``, ``isolation``). API-client,
kernel and service tests all talk to it over a real socket. It is stopped (SIGTERM,
which destroys every sandbox) at the end of the session; ``--exit-with-parent`` covers
a pytest that dies without cleaning up.

``require_isolation`` is for tests that only mean something under bubblewrap: with
``MODBOX_REQUIRE_ISOLATION=1`` (CI) a service without bwrap is a failure, elsewhere
the test is skipped with the reason. (Under that variable the service itself refuses
to start without a working bwrap, so the failure shows up even earlier.)

``local_sandbox`` is one running sandbox shared by the service tests that do not
need a fresh one (creating a sandbox is cheap, but not free); ``fresh_sandbox`` is one
of its own per test. ``canary`` is a module-wide random secret for the tests that plant
one in a service's environment and look for it from inside a sandbox.

Tests that need a service of their own (other limits, a canary, one they kill) use
``running_local_service`` (started, and stopped on exit) and, when it only means
something under bubblewrap, ``require_bwrap``; ``running_sandbox`` is a sandbox that
is destroyed on exit.

Host inspection for the isolation tests (``host_pids_of``, ``pid_namespace``,
``processes_in_pid_namespace``, ``processes_of_uid``, ``sandbox_cgroup_dirs``) reads
the host's /proc and cgroup trees directly, so a leak is seen however it happened.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

STARTUP_TIMEOUT_S = 60.0


def isolation_required() -> bool:
    return os.environ.get("MODBOX_REQUIRE_ISOLATION", "").strip().lower() in ("1", "true", "yes")


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.2) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def host_pids_of(sandbox_id: str) -> set[int]:
    """Host pids whose environment carries MODBOX_SANDBOX_ID=<sandbox_id>."""
    marker = f"MODBOX_SANDBOX_ID={sandbox_id}".encode()
    found = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if marker in f.read().split(b"\0"):
                    found.add(int(name))
        except OSError:
            continue
    return found


def pid_namespace(sandbox: LocalSandbox) -> str:
    """The sandbox's pid namespace, e.g. ``pid:[4026532871]`` (read from inside it)."""
    ns = sandbox.exec("readlink /proc/self/ns/pid")["stdout"].strip()
    assert ns.startswith("pid:["), ns
    return ns


def processes_in_pid_namespace(ns: str) -> set[int]:
    """Host pids of every live process in that pid namespace (root sees all of them).

    Zombies do not count: they run nothing and hold nothing but a pid until their
    parent reaps them (when the service is SIGKILLed, bwrap's processes are orphaned to
    the host's init, which may take a few seconds to reap them).
    """
    found = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.readlink(f"/proc/{name}/ns/pid") != ns:
                    continue
                with open(f"/proc/{name}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                        found.add(int(name))
            except (OSError, IndexError):
                continue
    return found


def processes_of_uid(uid: int) -> set[int]:
    """Host pids whose real uid is ``uid`` (zombies included: they keep their uid)."""
    found = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/status") as f:
                    for line in f:
                        if line.startswith("Uid:"):
                            if int(line.split()[1]) == uid:
                                found.add(int(name))
                            break
            except OSError:
                continue
    return found


def sandbox_cgroup_dirs(service_pid: int, sandbox_id: str) -> list[Path]:
    """The cgroup directories the service made for this sandbox that still exist."""
    name = f"modbox-{service_pid}-{sandbox_id}"
    return [p for p in Path("/sys/fs/cgroup").glob(f"**/{name}") if p.is_dir()]


@dataclass
class LocalService:
    """A running ``python -m modbox_kernel.local`` and how to reach it."""

    base_url: str
    token: str
    process: subprocess.Popen[bytes]
    isolation: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, **kwargs: Any) -> httpx.Client:
        """A control-plane client carrying the service token."""
        return httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=kwargs.pop("timeout", 60),
            **kwargs,
        )


def start_local_service(
    log_path: Path, *args: str, env: dict[str, str] | None = None
) -> LocalService:
    """Start the service and wait for its startup line (raises with its log if it fails)."""
    with open(log_path, "wb") as log:  # the child keeps its own copy of the fd
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "modbox_kernel.local",
                "--port",
                "0",
                "--exit-with-parent",
                *args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            env=env,
        )
    assert process.stdout is not None
    line = b""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    with selectors.DefaultSelector() as sel:
        sel.register(process.stdout, selectors.EVENT_READ)
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sel.select(remaining):
                break
            chunk = os.read(process.stdout.fileno(), 4096)
            if not chunk:
                break
            line += chunk
    if not line.endswith(b"\n"):
        stop_local_service_process(process)
        raise RuntimeError(
            "the local Modbox service did not announce itself; its log:\n"
            + log_path.read_text(errors="replace")
        )
    info = json.loads(line)
    return LocalService(
        base_url=info["base_url"],
        token=info["token"],
        process=process,
        isolation=info["isolation"],
        log_path=log_path,
    )


def stop_local_service_process(process: subprocess.Popen[bytes], timeout: float = 15) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout is not None:
        process.stdout.close()


@contextmanager
def running_local_service(
    log_path: Path, *args: str, env: dict[str, str] | None = None
) -> Iterator[LocalService]:
    """:func:`start_local_service`, stopped on exit (a no-op if the test killed it)."""
    service = start_local_service(log_path, *args, env=env)
    try:
        yield service
    finally:
        stop_local_service_process(service.process)


def require_bwrap(service: LocalService, why: str) -> None:
    """Fail (``MODBOX_REQUIRE_ISOLATION=1``) or skip, saying ``why``, unless bwrap isolates.

    For tests whose checks mean nothing without the jail: in CI a service that fell
    back to no isolation must be a failure, never a silent skip.
    """
    if service.isolation == "bwrap":
        return
    reason = f"the service runs with isolation={service.isolation!r}"
    if isolation_required():
        pytest.fail(f"MODBOX_REQUIRE_ISOLATION=1 but {reason}")
    pytest.skip(f"{reason}; {why}")


@pytest.fixture(scope="session")
def local_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalService]:
    with running_local_service(tmp_path_factory.mktemp("local-service") / "service.log") as service:
        yield service


@pytest.fixture
def require_isolation(local_service: LocalService) -> None:
    require_bwrap(
        local_service,
        "bubblewrap is unusable on this machine; set MODBOX_REQUIRE_ISOLATION=1 "
        "to make this a failure",
    )


@pytest.fixture(scope="module")
def canary() -> str:
    return f"canary-{uuid.uuid4().hex}"


@dataclass
class LocalSandbox:
    """A running sandbox and a runtime client for it."""

    id: str
    access_token: str
    exec_url: str
    files_url: str
    service: LocalService
    http: httpx.Client = field(repr=False)

    def exec(self, command: str, **extra: Any) -> dict[str, Any]:
        response = self.post_exec(command, **extra)
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    def post_exec(self, command: str, **extra: Any) -> httpx.Response:
        """The raw exec answer (for tests that expect an error envelope)."""
        return self.http.post(self.exec_url, json={"command": command, **extra})

    def close(self) -> None:
        self.http.close()


def create_sandbox(service: LocalService, **body: Any) -> LocalSandbox:
    """Create a sandbox, wait until it runs, return a client for it."""
    with service.client() as control:
        created = control.post("/sandboxes", json=body)
        assert created.status_code == 200, created.text
        info = created.json()
        waited = control.post(f"/sandboxes/{info['sandbox_id']}/wait", json={"timeout": 60})
        assert waited.json()["ready"], waited.text
    token = info["endpoint"]["access_token"]
    return LocalSandbox(
        id=info["sandbox_id"],
        access_token=token,
        exec_url=info["capabilities"]["exec"],
        files_url=info["capabilities"]["files"],
        service=service,
        http=httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=120),
    )


def destroy_sandbox(sandbox: LocalSandbox) -> None:
    with sandbox.service.client() as control:
        control.delete(f"/sandboxes/{sandbox.id}")
    sandbox.close()


@contextmanager
def running_sandbox(service: LocalService, **body: Any) -> Iterator[LocalSandbox]:
    """:func:`create_sandbox`, destroyed on exit (destroying twice is harmless)."""
    sandbox = create_sandbox(service, **body)
    try:
        yield sandbox
    finally:
        destroy_sandbox(sandbox)


@pytest.fixture(scope="session")
def local_sandbox(local_service: LocalService) -> Iterator[LocalSandbox]:
    with running_sandbox(local_service, task_id=f"shared-{os.getpid()}") as sandbox:
        yield sandbox


@pytest.fixture
def fresh_sandbox(local_service: LocalService) -> Iterator[LocalSandbox]:
    with running_sandbox(local_service) as sandbox:
        yield sandbox
