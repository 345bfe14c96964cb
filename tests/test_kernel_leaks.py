"""Kernels that come and go leave no sandbox behind.

``test_twenty_kernels_leave_no_sandbox`` starts 20 modbox kernels against the shared
local service, a few at a time; each runs a cell that prints the ``MODBOX_SANDBOX_ID``
the service put into its sandbox's environment. While they live, the test checks that
its two leak detectors see them (the service lists each sandbox as running; the host
/proc scan finds its processes), so neither check can pass vacuously. Then the kernels
shut down the way jupyter_client does it (every fourth one in the middle of a running
cell) and, within a short grace period, no sandbox of theirs may still be running and
no process of theirs may remain on the host. Only ids reported by these kernels are
checked, so sandboxes of other tests sharing the service do not matter.

``test_embedded_backend_dies_with_its_kernel`` covers the no-token path: the kernel's
own embedded service and every process under it must be gone after shutdown.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import psutil
import pytest
from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.manager import AsyncKernelManager
from jupyter_client.provisioning import LocalProvisioner
from kernel_helpers import (
    KERNEL_NAME,
    STARTUP_TIMEOUT,
    embedded_env,
    env_for_kernel,
    list_sandboxes,
    only_modbox,
    sandbox_processes,
    wait_until,
)

pytestmark = [pytest.mark.kernel, only_modbox("it has no sandboxes to leak")]

KERNELS = 20
AT_ONCE = 4
# Shutdown destroys the sandbox before the kernel exits (see docs/architecture.md); the
# grace only absorbs the service reaping the jail's processes after the DELETE returned.
GRACE = 10.0
SANDBOX_ID_CELL = "import os\nprint(os.environ.get('MODBOX_SANDBOX_ID', 'unset'))"


class LiveKernel:
    """One started kernel with its client, and the sandbox id its cell printed."""

    def __init__(self, km: AsyncKernelManager, kc: AsyncKernelClient, sandbox_id: str) -> None:
        self.km, self.kc, self.sandbox_id = km, kc, sandbox_id

    @classmethod
    async def start(cls, env: Mapping[str, str]) -> LiveKernel:
        km = AsyncKernelManager(kernel_name=KERNEL_NAME)
        await km.start_kernel(env=dict(env))
        kc = km.client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(timeout=STARTUP_TIMEOUT)
            stdout: list[str] = []

            def collect(msg: dict[str, Any]) -> None:
                if msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout":
                    stdout.append(msg["content"]["text"])

            reply = await kc.execute_interactive(SANDBOX_ID_CELL, output_hook=collect, timeout=120)
            assert reply["content"]["status"] == "ok", reply["content"]
        except BaseException:
            kc.stop_channels()
            await km.shutdown_kernel(now=True)
            raise
        return cls(km, kc, "".join(stdout).strip())

    async def shutdown(self, busy: bool) -> None:
        if busy:
            # A user closing a notebook whose cell is still running.
            self.kc.execute("import time\ntime.sleep(60)")
            await asyncio.sleep(1.0)
        self.kc.stop_channels()
        await self.km.shutdown_kernel()


async def test_twenty_kernels_leave_no_sandbox(request: pytest.FixtureRequest) -> None:
    env = env_for_kernel(request)
    svc = request.getfixturevalue("local_service")
    ours: list[str] = []

    for first in range(0, KERNELS, AT_ONCE):
        batch = await asyncio.gather(*(LiveKernel.start(env) for _ in range(AT_ONCE)))
        try:
            ids = [k.sandbox_id for k in batch]
            assert all(sid and sid != "unset" for sid in ids), f"MODBOX_SANDBOX_ID not set: {ids}"
            assert len(set(ids + ours)) == len(ids) + len(ours), "a sandbox id was reused"
            ours += ids

            running = {s["id"] for s in list_sandboxes(svc.base_url, svc.token, "running")}
            assert set(ids) <= running, (
                f"live sandboxes not listed as running: {set(ids) - running}"
            )
            seen = sandbox_processes(ids)
            assert set(seen) == set(ids), f"no host process found for {set(ids) - set(seen)}"
        finally:
            await asyncio.gather(
                *(k.shutdown(busy=(first + i) % 4 == 3) for i, k in enumerate(batch))
            )

    def still_running() -> set[str]:
        listed = {s["id"] for s in list_sandboxes(svc.base_url, svc.token, "running")}
        return listed & set(ours)

    wait_until(lambda: not still_running() and not sandbox_processes(ours), GRACE)
    assert len(ours) == KERNELS
    assert still_running() == set(), "sandboxes still running after their kernels shut down"
    assert sandbox_processes(ours) == {}, "sandbox processes left on the host"
    everything = {s["id"]: s["status"] for s in list_sandboxes(svc.base_url, svc.token)}
    assert {everything.get(sid) for sid in ours} == {"destroyed"}


async def test_embedded_backend_dies_with_its_kernel() -> None:
    kernel = await LiveKernel.start(embedded_env())
    assert isinstance(kernel.km.provisioner, LocalProvisioner)
    kernel_pid = kernel.km.provisioner.pid
    assert kernel_pid is not None
    tree = psutil.Process(kernel_pid).children(recursive=True)
    assert kernel.sandbox_id and kernel.sandbox_id != "unset"
    assert sandbox_processes([kernel.sandbox_id]), "the /proc scan does not see the sandbox"
    assert tree, "the kernel started no embedded service"

    await kernel.shutdown(busy=False)

    def alive(proc: psutil.Process) -> bool:
        try:
            return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def leftovers() -> list[psutil.Process]:
        return [p for p in tree if alive(p)]

    wait_until(lambda: not leftovers() and not sandbox_processes([kernel.sandbox_id]), GRACE)
    assert leftovers() == [], "processes of the kernel's embedded service outlived it"
    assert sandbox_processes([kernel.sandbox_id]) == {}
