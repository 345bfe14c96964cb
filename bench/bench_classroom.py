"""A class of N students on one host: modbox-python on one shared service vs python3.

One shared local service at its default settings (``python -m modbox_kernel.local``,
a known token), each student's kernel with its own owner credential, as the
classroom recipe sets them up (``docs/classroom.md``). For each kernel type, in the
same run:

* a class arriving: N kernels started one every ``--every`` s (0.5), each running
  ``1+1`` at once: start → first result p50/p95/max;
* all N started at the same moment: the same figures (both kernels are bound by N
  processes importing on the host's cores);
* idle ``1+1`` round trip p50/p95 across the class;
* a burst: every kernel runs a small cell at the same moment;
* host memory per idle kernel: the PSS of the kernel process plus, for modbox-python,
  every process of its sandbox (PSS shares what processes share, so the sum is what
  the class really costs the host).

Usage: ``python bench/bench_classroom.py [--students 40] [--every 0.5]``.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import psutil
from jupyter_client.manager import KernelManager

from modbox_kernel.local.owners import owner_token

IDLE_ROUNDS = 10
IDLE_CPU_SECONDS = 30.0


def host_cpu_percent(seconds: float) -> float:
    """CPU the whole host used over ``seconds``, in % of one core (nothing runs but
    the idle class: the benchmark itself sleeps)."""
    before = psutil.cpu_times()
    time.sleep(seconds)
    after = psutil.cpu_times()
    busy = sum(
        getattr(after, f) - getattr(before, f) for f in ("user", "nice", "system", "irq", "softirq")
    )
    return 100.0 * busy / seconds


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def run(kc: Any, code: str, timeout: float = 300) -> float:
    """Execute ``code``; seconds until its idle status (outputs included)."""
    t0 = time.perf_counter()
    msg_id = kc.execute(code)
    while True:
        msg = kc.get_iopub_msg(timeout=timeout)
        if (
            msg["parent_header"].get("msg_id") == msg_id
            and msg["msg_type"] == "status"
            and msg["content"]["execution_state"] == "idle"
        ):
            break
    reply = kc.get_shell_msg(timeout=timeout)
    assert reply["content"]["status"] == "ok", reply["content"]
    return time.perf_counter() - t0


class Student:
    def __init__(self, kernel: str, env: dict[str, str]) -> None:
        self.kernel, self.env = kernel, env
        self.home = tempfile.mkdtemp(prefix="student-")
        self.ipc = tempfile.mkdtemp(prefix="ipc-")
        with open(os.path.join(self.home, "data.csv"), "w") as f:
            f.write("x,y\n1,2\n")
        self.km: KernelManager | None = None
        self.kc: Any = None
        self.first_result = 0.0
        self.error: BaseException | None = None

    def arrive(self) -> None:
        try:
            t0 = time.perf_counter()
            # ipc, with an absolute path of its own: over tcp, forty kernels started at
            # once collide now and then, since jupyter_client picks a kernel's free
            # ports before that kernel binds them and another process may take one
            # meanwhile ("Address already in use"). The same transport for both kinds.
            self.km = KernelManager(
                kernel_name=self.kernel, transport="ipc", ip=os.path.join(self.ipc, "kernel")
            )
            # A student's own small folder (a home with one data file), not the
            # benchmark's working directory, is what gets copied into each sandbox.
            self.km.start_kernel(env=self.env, cwd=self.home)
            self.kc = self.km.client()
            self.kc.start_channels()
            self.kc.wait_for_ready(timeout=300)
            run(self.kc, "1+1")
            self.first_result = time.perf_counter() - t0
        except BaseException as exc:  # reported by the caller
            self.error = exc

    def leave(self) -> None:
        # A clean shutdown, as a Jupyter server or a hub's culler does it: the kernel
        # destroys its sandbox on the way out. (``now=True`` would SIGKILL it, and its
        # sandbox would hold a place in the service until its lease lapsed, 50 s
        # later: the next phase would then measure a queue left over from this one.)
        if self.kc is not None:
            self.kc.stop_channels()
        if self.km is not None:
            self.km.shutdown_kernel(now=False)
        shutil.rmtree(self.home, ignore_errors=True)
        shutil.rmtree(self.ipc, ignore_errors=True)


def arrive_all(students: list[Student], every: float) -> None:
    threads = []
    for student in students:
        thread = threading.Thread(target=student.arrive)
        thread.start()
        threads.append(thread)
        if every:
            time.sleep(every)
    for thread in threads:
        thread.join()
    failed = [s.error for s in students if s.error is not None]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(students)} kernels failed: {failed[0]!r}")


def leave_all(students: list[Student]) -> None:
    """Shut every kernel down at once, as a class leaving (a server shuts its kernels
    down concurrently too)."""
    threads = [threading.Thread(target=s.leave) for s in students]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def wait_until_empty(url: str, secret: str, timeout: float = 120.0) -> None:
    """Return once the shared service holds no live sandbox (the admin credential sees
    every owner's), so that each phase starts on an empty host; a sandbox still live
    after ``timeout`` is a leak and fails the run."""
    deadline = time.monotonic() + timeout
    headers = {"Authorization": f"Bearer {secret}"}
    while True:
        listed = httpx.get(f"{url}/sandboxes", headers=headers, timeout=30).json()
        live = [s["id"] for s in listed["sandboxes"] if s["status"] != "destroyed"]
        if not live:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{len(live)} sandboxes still live {timeout:.0f} s after the class left"
            )
        time.sleep(0.5)


def in_parallel(students: list[Student], work: Callable[[Student], float]) -> list[float]:
    results: list[float] = [0.0] * len(students)
    barrier = threading.Barrier(len(students))

    def one(i: int) -> None:
        barrier.wait()
        results[i] = work(students[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(students))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def sandbox_pids(sandbox_id: str) -> list[int]:
    marker = f"MODBOX_SANDBOX_ID={sandbox_id}".encode()
    found = []
    for pid in psutil.pids():
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if marker in f.read().split(b"\0"):
                    found.append(pid)
        except OSError:
            continue
    return found


def pss(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_full_info().pss
        except psutil.Error:
            continue
    return total


def memory_per_kernel(students: list[Student], modbox: bool) -> float:
    """Mean PSS (MiB) of a kernel process plus its sandbox's processes."""
    sizes = []
    for student in students:
        assert student.km is not None and student.km.provisioner is not None
        pids = [student.km.provisioner.pid]  # type: ignore[attr-defined]
        if modbox:
            msg_id = student.kc.execute("import os; print(os.environ['MODBOX_SANDBOX_ID'])")
            while True:
                msg = student.kc.get_iopub_msg(timeout=60)
                if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream":
                    break
            student.kc.get_shell_msg(timeout=60)
            pids += sandbox_pids(msg["content"]["text"].strip())
        sizes.append(pss(pids) / 2**20)
    return statistics.mean(sizes)


def measure(
    kernel: str,
    envs: list[dict[str, str]],
    every: float,
    settle: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Both phases for one kernel type; ``settle`` runs after each phase's class left."""
    figures: dict[str, float] = {}
    for label, gap in (("arriving", every), ("together", 0.0)):
        students = [Student(kernel, env) for env in envs]
        try:
            arrive_all(students, gap)
            starts = [s.first_result for s in students]
            figures[f"{label} p50"] = pct(starts, 50)
            figures[f"{label} p95"] = pct(starts, 95)
            figures[f"{label} max"] = max(starts)
            if label == "arriving":
                time.sleep(2.0)  # the class settles
                figures["idle cpu"] = host_cpu_percent(IDLE_CPU_SECONDS)
                idle = [run(s.kc, "1+1") for _ in range(IDLE_ROUNDS) for s in students]
                figures["idle p50"] = pct(idle, 50)
                figures["idle p95"] = pct(idle, 95)
                burst = in_parallel(students, lambda s: run(s.kc, "sum(range(10**5))"))
                figures["burst p50"] = pct(burst, 50)
                figures["burst p95"] = pct(burst, 95)
                figures["memory"] = memory_per_kernel(students, kernel != "python3")
        finally:
            leave_all(students)
        if settle is not None:
            settle()
        time.sleep(3.0)  # let the host settle between phases
    return figures


def start_service(secret: str) -> tuple[subprocess.Popen[bytes], str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "modbox_kernel.local", "--port", "0", "--token", secret],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert process.stdout is not None
    info = json.loads(process.stdout.readline())
    return process, str(info["base_url"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--students", type=int, default=40)
    parser.add_argument("--every", type=float, default=0.5)
    args = parser.parse_args()
    base = {k: v for k, v in os.environ.items() if not k.startswith("MODBOX_")}
    secret = secrets.token_hex(24)
    service, url = start_service(secret)
    try:
        names = [f"student{i:02d}" for i in range(args.students)]
        modbox_envs = [
            {**base, "MODBOX_API_URL": url, "MODBOX_API_TOKEN": owner_token(secret, n)}
            for n in names
        ]
        python3 = measure("python3", [base] * args.students, args.every)
        modbox = measure(
            "modbox-python", modbox_envs, args.every, lambda: wait_until_empty(url, secret)
        )
        # The same idle class without the waiting request for between-cells output:
        # the difference is what listening for it costs.
        quiet_envs = [{**env, "MODBOX_IDLE_OUTPUT": "0"} for env in modbox_envs]
        quiet = [Student("modbox-python", env) for env in quiet_envs]
        try:
            arrive_all(quiet, 0.0)
            time.sleep(2.0)
            no_listening = host_cpu_percent(IDLE_CPU_SECONDS)
        finally:
            leave_all(quiet)
        wait_until_empty(url, secret)
    finally:
        service.terminate()
        service.wait(60)
    print(f"\n{args.students} students, one shared service at default settings")
    print(f"{'metric':40s}{'python3':>10s}{'modbox':>10s}{'ratio':>8s}")
    for key in python3:
        unit = {"memory": "MiB", "idle cpu": "%"}.get(key, "s")
        p, m = python3[key], modbox[key]
        if unit == "s":
            shown = (
                (f"{p * 1000:.0f}ms", f"{m * 1000:.0f}ms") if m < 1 else (f"{p:.2f}s", f"{m:.2f}s")
            )
        elif unit == "%":
            shown = (f"{p:.2f}%", f"{m:.2f}%")
        else:
            shown = (f"{p:.0f}MiB", f"{m:.0f}MiB")
        label = {
            "arriving p50": "class arriving: start -> result p50",
            "arriving p95": "class arriving: start -> result p95",
            "arriving max": "class arriving: start -> result max",
            "together p50": "all at once: start -> result p50",
            "together p95": "all at once: start -> result p95",
            "together max": "all at once: start -> result max",
            "idle p50": "idle 1+1 round trip p50",
            "idle p95": "idle 1+1 round trip p95",
            "burst p50": "burst (all run a cell) p50",
            "burst p95": "burst (all run a cell) p95",
            "memory": "host memory per idle kernel (PSS)",
            "idle cpu": "idle class: host CPU, % of one core",
        }[key]
        ratio = f"{m / p:>7.2f}x" if p else "      -"
        print(f"{label:40s}{shown[0]:>10s}{shown[1]:>10s}{ratio}")
    print(
        f"idle class without between-cells listening (MODBOX_IDLE_OUTPUT=0): {no_listening:.2f}% "
        f"of one core; listening for it costs {modbox['idle cpu'] - no_listening:.2f}%"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
