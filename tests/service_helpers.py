"""The local Modbox service, its sandboxes and the host, for the tests that use them.

Plain helpers, imported by name (``from service_helpers import ...``); the fixtures built
on them (``local_service``, ``require_isolation``, ``local_sandbox``, ``fresh_sandbox``)
live in tests/conftest.py.

Who uses what:

* :class:`LocalService` (``base_url``, ``token``, ``process``, ``isolation``, the log) is
  what the ``local_service`` fixture yields and what every test that talks to a service
  annotates; :class:`LocalSandbox` (a running sandbox with a runtime client) likewise
  for ``local_sandbox`` and ``fresh_sandbox``.
* Tests that need a service of their own (other limits, a canary, a proxy in front, one
  they kill): :func:`running_local_service` (started, and stopped on exit), or
  :func:`start_local_service` and :func:`stop_local_service_process` when the test
  controls the lifetime itself (test_local_cli.py, test_kernel_faults.py,
  test_kernel_limits.py). The service is ``python -m modbox_kernel.local --port 0
  --exit-with-parent``; its one-line JSON startup announcement is read within
  :data:`STARTUP_TIMEOUT_S`, and ``--exit-with-parent`` covers a pytest that dies
  without cleaning up.
* :func:`require_bwrap` is for tests that only mean something under bubblewrap (the
  ``require_isolation`` fixture applies it to ``local_service``): with
  ``MODBOX_REQUIRE_ISOLATION=1`` (CI, :func:`isolation_required`, which
  test_local_limits.py also reads) a service without bwrap is a failure, elsewhere the
  test is skipped with the reason.
* Sandboxes: :func:`create_sandbox` and :func:`destroy_sandbox`, or
  :func:`running_sandbox` (destroyed on exit).
* Host inspection for the isolation tests (test_adversarial.py, test_crowding.py,
  test_adversarial_kernel.py, test_local_*.py): :func:`host_pids_of`,
  :func:`pid_namespace`, :func:`processes_in_pid_namespace`, :func:`processes_of_uid`
  and :func:`sandbox_cgroup_dirs` read the host's /proc and cgroup trees directly, so a
  leak is seen however it happened.
* :func:`wait_until` polls a condition (test_adversarial.py, test_local_cli.py);
  tests/kernel_helpers.py re-exports it for the kernel tests.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
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
