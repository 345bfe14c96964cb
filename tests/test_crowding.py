"""A crowded host: six hostile sandboxes at once must not stall a seventh (issue 5).

A dedicated service with tight limits per sandbox (128 MiB, 32 processes, a quarter of
a CPU, 32 MiB of /tmp and workspace) runs two fork bombs, a memory hog, two busy loops
and a disk filler, each started in the background inside its own sandbox and bounded
by ``timeout`` there. While they run (checked on the host: each load's processes are
alive, the bombs hold their pids, the hog holds its memory), a seventh sandbox is
created and must answer ``exec("echo ok")`` within 2 s. Then all seven are destroyed
and no process of the sandbox uid, and no cgroup of them, may remain.

It needs bubblewrap (and, for the host-side uid check, root): with
``MODBOX_REQUIRE_ISOLATION=1`` (CI) a service without bwrap fails it, elsewhere it
skips with the reason.
"""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from service_helpers import (
    LocalSandbox,
    LocalService,
    create_sandbox,
    destroy_sandbox,
    pid_namespace,
    processes_in_pid_namespace,
    processes_of_uid,
    require_bwrap,
    running_local_service,
    sandbox_cgroup_dirs,
)

pytestmark = [pytest.mark.isolation]

SANDBOX_UID = 64124
PIDS = 32
MEMORY_MIB = 128
LIMITS = (
    "--memory-mib", str(MEMORY_MIB),
    "--pids", str(PIDS),
    "--cpus", "0.25",
    "--tmp-mib", "32",
    "--workspace-mib", "32",
    "--fsize-mib", "16",
    "--exec-timeout", "60",
    "--sandbox-uid", str(SANDBOX_UID),
)  # fmt: skip
LOAD_SECONDS = 60  # every load ends by itself after this, whatever happens to the test
ECHO_WITHIN_S = 2.0

PYTHON_FORK_BOMB = """
import os, time
while True:
    try:
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
    except OSError:
        pass
"""
MEMORY_HOG = f"""
held = bytearray({MEMORY_MIB - 64} << 20)  # zero-filled: every page touched, and kept
while True:
    churn = bytearray(16 << 20)  # plus a churn that keeps the cgroup near its limit
    del churn
    for i in range(0, len(held), 1 << 16):
        held[i] = (held[i] + 1) % 256
"""
DISK_FILLER = """
import os
while True:
    for where in ('/tmp', '/workspace'):
        i = 0
        try:
            while True:
                with open(f'{where}/fill{i}', 'wb') as f:
                    f.write(b'x' * (4 << 20))
                i += 1
        except OSError:
            pass
        for name in os.listdir(where):
            if name.startswith('fill'):
                os.unlink(os.path.join(where, name))
"""
LOADS = {
    "python fork bomb": f"python3 -c {shlex.quote(PYTHON_FORK_BOMB)}",
    "bash fork bomb": "bash -c 'b() { b | b & }; b' 2>/dev/null",
    "memory hog": f"python3 -c {shlex.quote(MEMORY_HOG)}",
    "busy loop": "python3 -c 'while True: pass'",
    "busy shell loop": "bash -c 'while :; do :; done'",
    "disk filler": f"python3 -c {shlex.quote(DISK_FILLER)}",
}


@pytest.fixture(scope="module")
def crowded_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalService]:
    log = tmp_path_factory.mktemp("crowding") / "service.log"
    with running_local_service(log, *LIMITS) as service:
        require_bwrap(service, "the crowding test needs bubblewrap's limits")
        yield service


def _start_load(sandbox: LocalSandbox, command: str) -> None:
    # setsid + nohup: the load outlives this exec; timeout bounds it inside the sandbox.
    line = (
        f"setsid nohup timeout -s KILL {LOAD_SECONDS} bash -c {shlex.quote(command)} "
        ">/dev/null 2>&1 </dev/null & echo started"
    )
    assert sandbox.exec(line)["stdout"] == "started\n"


def _memory_usage(service: LocalService, sandbox: LocalSandbox) -> int:
    for d in sandbox_cgroup_dirs(service.pid, sandbox.id):
        for name in ("memory.usage_in_bytes", "memory.current"):
            if (d / name).exists():
                return int((d / name).read_text())
    return -1


def test_a_seventh_sandbox_answers_within_two_seconds_while_six_misbehave(
    crowded_service: LocalService,
) -> None:
    hostile: dict[str, tuple[LocalSandbox, str]] = {}
    seventh = None
    try:
        for name, command in LOADS.items():
            sandbox = create_sandbox(crowded_service, task_id=name.replace(" ", "-"))
            hostile[name] = (sandbox, pid_namespace(sandbox))
            _start_load(sandbox, command)
        time.sleep(3)  # let the bombs fill their pid tables and the hog its memory

        # The loads really run: on the host, each sandbox's processes are alive.
        counts = {name: len(processes_in_pid_namespace(ns)) for name, (_, ns) in hostile.items()}
        assert counts["python fork bomb"] >= PIDS - 8, counts
        assert counts["bash fork bomb"] >= PIDS - 8, counts
        assert all(count >= 4 for count in counts.values()), counts  # init, supervisor, load
        hog = _memory_usage(crowded_service, hostile["memory hog"][0])
        if hog >= 0:  # a memory cgroup is in force
            assert hog > (MEMORY_MIB // 2) << 20, hog

        started = time.monotonic()
        seventh = create_sandbox(crowded_service, task_id="seventh")
        created_in = time.monotonic() - started
        latencies = []
        for _ in range(3):
            started = time.monotonic()
            assert seventh.exec("echo ok")["stdout"] == "ok\n"
            latencies.append(time.monotonic() - started)
        # Shown with -s (and in failure reports): the figures behind the assertions.
        print(
            f"crowding: processes {counts}, hog {hog >> 20} MiB, seventh created in "
            f"{created_in:.2f} s, echo {', '.join(f'{x:.3f}' for x in latencies)} s"
        )
        assert max(latencies) < ECHO_WITHIN_S, latencies
        assert created_in < 10, created_in

        # Still crowded at the end of the measurement (no load had died meanwhile).
        after = {name: len(processes_in_pid_namespace(ns)) for name, (_, ns) in hostile.items()}
        assert all(count >= 4 for count in after.values()), after
    finally:
        namespaces = [ns for _, ns in hostile.values()]
        everyone = [sandbox for sandbox, _ in hostile.values()] + ([seventh] if seventh else [])
        started = time.monotonic()
        for sandbox in everyone:
            destroy_sandbox(sandbox)
        destroyed_in = time.monotonic() - started
    assert destroyed_in < 30, destroyed_in

    def leftovers() -> set[int]:
        found = set().union(*(processes_in_pid_namespace(ns) for ns in namespaces))
        return found | (processes_of_uid(SANDBOX_UID) if os.geteuid() == 0 else set())

    # Processes killed on a loaded host may take a moment to finish exiting (see
    # test_adversarial); what is still there 2 s on is a leak.
    deadline = time.monotonic() + 2
    while leftovers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert leftovers() == set()
    for sandbox in everyone:
        assert sandbox_cgroup_dirs(crowded_service.pid, sandbox.id) == []
    assert not list(Path("/tmp").glob("fill*"))
