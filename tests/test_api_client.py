"""ModboxClient and SandboxRuntime against the real embedded service on a socket.

Uses the session-scoped ``local_service`` fixture (tests/conftest.py), which runs
``python -m modbox_kernel.local --port 0`` and yields its ``base_url`` and ``token``.
Every sandbox made here goes through the ``sandboxes`` factory, which destroys it at
teardown, so a failing test leaks nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from kernel_helpers import sandbox_processes

from modbox_kernel.api import ModboxClient, SandboxInfo, SandboxRuntime
from modbox_kernel.errors import AuthenticationError, NotFoundError

Started = tuple[SandboxInfo, SandboxRuntime, str]
StartSandbox = Callable[[], Awaitable[Started]]


@pytest.fixture
async def client(local_service) -> AsyncIterator[ModboxClient]:  # type: ignore[no-untyped-def]
    async with ModboxClient(local_service.base_url, local_service.token) as c:
        yield c


@pytest.fixture
async def start_sandbox(client: ModboxClient) -> AsyncIterator[StartSandbox]:
    """Factory: create + wait + runtime, with destroy registered before anything else."""
    made: list[tuple[str, SandboxRuntime | None]] = []

    async def start() -> Started:
        key = secrets.token_urlsafe(24)
        created = await client.create_sandbox(
            task_id=f"test-api-{uuid.uuid4().hex[:8]}",
            ttl_seconds=600,
            env_vars={"SANDBOX_API_KEY": key},
        )
        made.append((created.id, None))
        detail = await client.wait_until_running(created.id, timeout=60)
        info = created.merged(detail)
        runtime = client.runtime(info, key)
        made[-1] = (created.id, runtime)
        return info, runtime, key

    yield start
    for sandbox_id, runtime in made:
        if runtime is not None:
            await runtime.aclose()
        await client.destroy_sandbox(sandbox_id)


async def test_health(client: ModboxClient) -> None:
    assert await client.health() is True


async def test_lifecycle_create_wait_exec_upload_destroy(client: ModboxClient) -> None:
    key = secrets.token_urlsafe(24)
    name = f"test-api-{uuid.uuid4().hex[:8]}"
    created = await client.create_sandbox(
        task_id=name, ttl_seconds=600, env_vars={"SANDBOX_API_KEY": key}
    )
    try:
        assert created.status in ("provisioning", "running")
        assert created.name == name
        detail = await client.wait_until_running(created.id, timeout=60)
        assert detail.id == created.id
        assert detail.status == "running"
        assert detail.name == name
        info = created.merged(detail)
        assert info.sandbox_url or info.capabilities.get("exec")

        listed = await client.list_sandboxes(status="running")
        assert created.id in {s.id for s in listed}

        async with client.runtime(info, key) as rt:
            hi = await rt.exec("echo hi")
            assert (hi.exit_code, hi.stdout, hi.stderr) == (0, "hi\n", "")
            assert hi.duration_ms >= 0

            failed = await rt.exec("echo oops >&2; exit 3")
            assert (failed.exit_code, failed.stdout, failed.stderr) == (3, "", "oops\n")

            payload = "line one\nünïcode ✓ $HOME `x` 'q'\n".encode()
            filename = f"up-{uuid.uuid4().hex[:6]}.txt"
            await rt.upload(filename, payload)
            cat = await rt.exec(f"cat /workspace/uploads/{filename}")
            assert cat.exit_code == 0
            assert cat.stdout.encode() == payload
    finally:
        assert await client.destroy_sandbox(created.id) is True

    after = await client.get_sandbox(created.id)
    assert after.status == "destroyed"
    # Destroying again is not an error (the API calls destroy idempotent).
    assert await client.destroy_sandbox(created.id) is True


async def test_background_process_survives_between_execs_and_dies_on_destroy(
    client: ModboxClient, start_sandbox: StartSandbox
) -> None:
    info, rt, _ = await start_sandbox()
    started = await rt.exec("nohup sleep 300 >/dev/null 2>&1 & echo $!")
    assert started.exit_code == 0
    pid = int(started.stdout.strip())

    seen = await rt.exec(f"kill -0 {pid} && cat /proc/{pid}/cmdline | tr '\\0' ' '")
    assert seen.exit_code == 0, seen.stderr
    assert seen.stdout.strip() == "sleep 300"

    assert sandbox_processes([info.id]), "the sandbox's processes should be visible on the host"
    assert await client.destroy_sandbox(info.id) is True
    for _ in range(50):
        left = sandbox_processes([info.id])
        if not left:
            break
        await asyncio.sleep(0.1)
    assert left == {}, f"processes of sandbox {info.id} still alive after destroy: {left}"


async def test_runtime_works_with_only_the_api_key(
    client: ModboxClient, start_sandbox: StartSandbox
) -> None:
    info, _, key = await start_sandbox()
    # Drop the issued token: the SANDBOX_API_KEY from env_vars must be accepted alone.
    bare = SandboxInfo(
        id=info.id,
        status=info.status,
        sandbox_url=info.sandbox_url,
        api_url=info.api_url,
        capabilities=info.capabilities,
    )
    async with client.runtime(bare, key) as rt:
        res = await rt.exec("echo $((6 * 7))")
    assert (res.exit_code, res.stdout) == (0, "42\n")


async def test_runtime_rejects_a_wrong_key(
    client: ModboxClient, start_sandbox: StartSandbox
) -> None:
    info, _, _ = await start_sandbox()
    bare = SandboxInfo(id=info.id, sandbox_url=info.sandbox_url, capabilities=info.capabilities)
    async with client.runtime(bare, "not-the-key") as rt:
        with pytest.raises(AuthenticationError) as caught:
            await rt.exec("true")
    assert caught.value.status_code == 401
    assert "SANDBOX_API_KEY" in str(caught.value)


async def test_get_of_unknown_sandbox_is_not_found(client: ModboxClient) -> None:
    with pytest.raises(NotFoundError) as caught:
        await client.get_sandbox(str(uuid.uuid4()))
    assert caught.value.status_code == 404
    assert await client.destroy_sandbox(str(uuid.uuid4())) is False


async def test_wrong_token_is_an_authentication_error(local_service) -> None:  # type: ignore[no-untyped-def]
    async with ModboxClient(local_service.base_url, "mbx_wrong_token") as bad:
        with pytest.raises(AuthenticationError) as caught:
            await bad.list_sandboxes()
    assert caught.value.status_code == 401
    assert "MODBOX_API_TOKEN" in str(caught.value)
    assert "mbx_wrong_token" not in str(caught.value)


async def test_no_secret_reaches_debug_logs(
    client: ModboxClient,
    start_sandbox: StartSandbox,
    local_service,
    caplog: pytest.LogCaptureFixture,  # type: ignore[no-untyped-def]
) -> None:
    caplog.set_level(logging.DEBUG)  # root: includes httpx and httpcore
    info, rt, key = await start_sandbox()
    await rt.exec("true")
    await rt.upload("x.bin", os.urandom(64))
    await client.get_sandbox(info.id)
    # Our own DEBUG lines are there (method, path, status), so the check below bites.
    assert any(
        r.name == "modbox_kernel.api" and r.levelno == logging.DEBUG and "POST" in r.getMessage()
        for r in caplog.records
    )
    for secret in (local_service.token, info.access_token, key):
        if secret:
            assert secret not in caplog.text
            assert secret not in repr(client) + repr(rt) + repr(info)
