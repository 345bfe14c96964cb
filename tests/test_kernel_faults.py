"""Network faults between the kernel and Modbox (issue 4; fault scenarios: docs/isolation.md).

A dedicated local service is started with ``--public-url <proxy>``, so that both the
control plane and the runtime URLs it hands out (``capabilities.exec``) go through
``tests/faultproxy.py``; a kernel (jupyter_client) uses ``MODBOX_API_URL=<proxy>``. The
proxy then resets connections after forwarding a request, cuts responses in half,
holds responses, answers bursts of 503 with the Modbox envelope, or goes down.

The workload is a cell that prints 1..1000 with small sleeps, so its output arrives
over many long polls, and counts its own executions in the sandbox's namespace. Under
every fault the frontend must receive each number exactly once and in order, and the
cell must have run exactly once: the agent deduplicates a resent ``execute`` by cell
id and polls resume from a cursor (docs/agent-protocol.md). Faults are aimed at the
agent operation an exec carries (``execute`` or ``poll``, read from the request the way
the agent reads it), and each test asserts that its faults were really injected.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import pytest
from faultproxy import Fault, FaultProxy, Request
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager
from kernel_helpers import (
    KERNEL_NAME,
    CellRun,
    only_modbox,
    pump,
    run_cell,
    running_kernel,
    service_env,
    start_cell,
)
from service_helpers import LocalService, start_local_service, stop_local_service_process

pytestmark = [pytest.mark.kernel, only_modbox("it does not talk to Modbox")]

NUMBERS = 1000
COUNTED_CELL = (
    "import time\n"
    "executions += 1\n"
    f"for i in range(1, {NUMBERS + 1}):\n"
    "    print(i, flush=True)\n"
    "    time.sleep(0.002)\n"
)
EXPECTED = "".join(f"{i}\n" for i in range(1, NUMBERS + 1))
# The agent request inside an exec command: printf '%s %s\n' "$T" <base64 JSON> (quoted
# only if shlex thinks it needs to be).
_PAYLOAD = re.compile(r"\"\$T\" '?([A-Za-z0-9+/=]+)'? ")


def agent_op(request: Request) -> str | None:
    """The agent operation a request carries (``execute``, ``poll``…), else None: an exec
    of the bash request line, or the local service's agent route (which the kernel uses
    when the sandbox advertises it)."""
    if request.method != "POST" or not request.path.endswith(
        ("/modbox/api/exec", "/modbox/api/agent")
    ):
        return None
    try:
        body = request.json()
        if request.path.endswith("/agent"):
            encoded = str(body["request"])
        else:
            command = body["command"] if isinstance(body, dict) else ""
            match = _PAYLOAD.search(command)
            if match is None:
                return "other"  # bootstrap commands and the like
            encoded = match.group(1)
        op = json.loads(base64.b64decode(encoded))["op"]
    except (ValueError, KeyError, TypeError):
        return "other"
    return str(op)


class Rule:
    """A thread-safe decider: ``plan(op, n)`` gets the op and its 1-based count."""

    def __init__(self, plan: Callable[[str, int], Fault | None]) -> None:
        self.plan = plan
        self.seen: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, request: Request) -> Fault | None:
        op = agent_op(request)
        if op is None:
            return None
        with self._lock:
            self.seen[op] = n = self.seen.get(op, 0) + 1
        return self.plan(op, n)


@dataclass
class Setup:
    proxy: FaultProxy
    service: LocalService
    km: KernelManager
    kc: BlockingKernelClient


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    log = tmp_path_factory.mktemp("proxied-service") / "service.log"
    with FaultProxy() as proxy:
        service = start_local_service(log, "--public-url", proxy.url)
        try:
            parts = urlsplit(service.base_url)
            assert parts.hostname is not None and parts.port is not None
            proxy.upstream = (parts.hostname, parts.port)
            env = service_env(proxy.url, service.token)
            with running_kernel(KERNEL_NAME, env, warm="executions = 0") as kernel:
                yield Setup(proxy, service, kernel.km, kernel.kc)
        finally:
            stop_local_service_process(service.process)


@pytest.fixture
def env(setup: Setup) -> Iterator[Setup]:
    """Each test starts with a healthy proxy, a zero execution counter, and ends so too."""
    setup.proxy.decide = lambda request: None
    setup.proxy.injected.clear()
    reset = run_cell(setup.kc, "executions = 0", timeout=60)
    assert reset.status == "ok", reset.describe()
    yield setup
    setup.proxy.decide = lambda request: None
    setup.proxy.come_back()


def run_counted(s: Setup, rule: Rule, what: str, timeout: float = 120) -> CellRun:
    """Run the counted cell with ``rule`` choosing faults; check it ran and printed once.

    The figures (``pytest -s``) are printed before the checks, so a failure shows them.
    """
    s.proxy.decide = rule
    run = run_cell(s.kc, COUNTED_CELL, timeout=timeout)
    s.proxy.decide = lambda request: None
    gaps = [b - a for a, b in zip(run.output_times, run.output_times[1:], strict=False)]
    print(
        f"\n{what}: the cell took {run.reply_at - run.sent_at:.2f} s, longest silence "
        f"between outputs {max(gaps, default=0.0):.2f} s; injected "
        f"{dict(s.proxy.injected)}; agent requests {rule.seen}"
    )
    check_exactly_once(s, run)
    return run


def check_exactly_once(s: Setup, run: CellRun) -> None:
    assert run.status == "ok", run.describe()[:3000]
    got = run.stdout
    if got != EXPECTED:
        numbers = [int(x) for x in got.split()]
        dupes = sorted({n for n in numbers if numbers.count(n) > 1})[:10]
        missing = sorted(set(range(1, NUMBERS + 1)) - set(numbers))[:10]
        pytest.fail(
            f"stdout is not 1..{NUMBERS} exactly once: {len(numbers)} numbers, "
            f"duplicated {dupes}, missing {missing}"
        )
    count = run_cell(s.kc, "print(executions)")
    assert count.stdout == "1\n", f"the cell ran {count.stdout.strip()} times"


def test_runtime_traffic_goes_through_the_proxy(env: Setup) -> None:
    # Without --public-url the exec calls would bypass the proxy and every test below
    # would pass without a single fault on the runtime path.
    with httpx.Client(
        base_url=env.proxy.url, headers={"Authorization": f"Bearer {env.service.token}"}
    ) as control:
        created = control.post("/sandboxes", json={"task_id": "faultproxy-probe"})
        assert created.status_code == 200, created.text
        info = created.json()
        control.delete(f"/sandboxes/{info['sandbox_id']}")
    assert info["capabilities"]["exec"].startswith(env.proxy.url + "/")

    rule = Rule(lambda op, n: None)
    run_counted(env, rule, "no faults")

    assert rule.seen.get("execute") == 1 and rule.seen.get("poll", 0) >= 3, rule.seen


@pytest.mark.timeout(180)
def test_connection_resets_mid_poll_lose_and_repeat_nothing(env: Setup) -> None:
    def plan(op: str, n: int) -> Fault | None:
        if op != "poll":
            return None
        # The request reached the agent (it may have handed out events) but the
        # answer never arrives, or arrives half.
        return {0: Fault("reset"), 1: Fault("cut")}.get(n % 3)

    run_counted(env, Rule(plan), "resets mid-poll")

    assert env.proxy.injected["reset"] >= 3 and env.proxy.injected["cut"] >= 3


@pytest.mark.timeout(180)
def test_a_reset_after_the_submit_does_not_run_the_cell_twice(env: Setup) -> None:
    # The first execute reaches the agent, which starts the cell; its answer is lost,
    # so the kernel must resend it, and the agent must not run the code again.
    rule = Rule(lambda op, n: Fault("reset") if op == "execute" and n == 1 else None)
    run_counted(env, rule, "reset after the submit")

    assert env.proxy.injected["reset"] == 1
    assert rule.seen["execute"] >= 2, rule.seen


@pytest.mark.timeout(180)
def test_bursts_of_503_lose_and_repeat_nothing(env: Setup) -> None:
    def plan(op: str, n: int) -> Fault | None:
        if op == "execute" and n <= 3:
            return Fault("status", status=503)  # never forwarded: the cell starts late
        if op == "poll" and n % 8 in (2, 3, 4, 5):
            return Fault("status", status=503)
        return None

    run_counted(env, Rule(plan), "503 bursts")

    assert env.proxy.injected["status"] >= 11


@pytest.mark.timeout(180)
def test_stalled_responses_delay_but_lose_nothing(env: Setup) -> None:
    rule = Rule(lambda op, n: Fault("stall", seconds=1.5) if op == "poll" and n % 3 == 0 else None)
    run_counted(env, rule, "polls stalled for 1.5 s")

    assert env.proxy.injected["stall"] >= 2


@pytest.mark.timeout(240)
def test_a_poll_answer_that_never_comes(env: Setup) -> None:
    # Held far beyond the kernel's read timeout: the kernel must give up on that
    # request, poll again from its cursor, and still deliver everything once.
    rule = Rule(lambda op, n: Fault("stall", seconds=120) if op == "poll" and n == 3 else None)
    run_counted(env, rule, "poll held forever", timeout=150)

    assert env.proxy.injected["stall"] == 1


@pytest.mark.timeout(240)
def test_an_unreachable_service_ends_the_cell_with_a_sentence(env: Setup) -> None:
    assert run_cell(env.kc, "kept = 'still here'").status == "ok"
    code = "import time\nprint('before', flush=True)\ntime.sleep(3)\nprint('after')"
    run = start_cell(env.kc, code, "before")

    env.proxy.go_down()
    down_at = time.monotonic()
    ended = pump(env.kc, run, lambda: run.done, 120)

    assert ended, f"the cell hangs while the service is unreachable:\n{run.describe()}"
    took = run.reply_at - down_at
    content = run.reply["content"]
    print(f"\nservice unreachable: the cell ended after {took:.1f} s: {content.get('evalue')}")
    assert content["status"] == "error", run.describe()
    shown = [m["content"] for m in run.outputs if m["msg_type"] == "error"]
    assert len(shown) == 1 and shown[0]["evalue"] == content["evalue"], run.describe()
    # A sentence: it says what failed and where, not just an exception class.
    evalue = content["evalue"]
    assert "sandbox" in evalue and env.proxy.url in evalue, evalue
    assert "connect" in evalue or "connection" in evalue, evalue
    assert took < 60, f"the kernel needed {took:.1f} s to give up"
    assert env.km.is_alive()

    env.proxy.come_back()
    after = run_cell(env.kc, "print(kept)", timeout=60)
    assert after.status == "ok", after.describe()
    assert "still here" in after.stdout, after.describe()


def test_a_cell_that_writes_no_file_costs_no_extra_request(env: Setup) -> None:
    # What a cell changed in the working folder rides in its done event: a cell that
    # writes nothing makes the same requests as before files came back (one execute,
    # polls only if it outlives the submit), and one that writes a file adds a read.
    quiet = Rule(lambda op, n: None)
    env.proxy.decide = quiet
    run = run_cell(env.kc, "quiet = sum(range(10))")
    env.proxy.decide = lambda request: None
    assert run.status == "ok", run.describe()
    ops = {op: n for op, n in quiet.seen.items() if op != "background"}
    assert ops.get("execute") == 1 and set(ops) <= {"execute", "poll"}, quiet.seen

    writing = Rule(lambda op, n: None)
    env.proxy.decide = writing
    wrote = run_cell(env.kc, "open('made.txt', 'w').write('x')")
    env.proxy.decide = lambda request: None
    assert wrote.status == "ok" and wrote.stderr == "", wrote.describe()
    assert writing.seen.get("read") == 1, writing.seen
