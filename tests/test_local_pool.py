"""The service's pool of ready sandboxes (``--pool N``), and kernels adopting its agents.

Against real local services over real sockets, real bubblewrap where it works, and
real kernels through jupyter_client. What must hold: a pooled sandbox is invisible
until a create takes it; the create gets the creator's ``env_vars`` (in commands and in
the agent's Python); the detail advertises the agent, which a kernel adopts only while
no cell has reached it; a kernel that takes a pooled sandbox after another kernel on
the same service sees no file, variable, process or environment variable of that
kernel; the notebook's environment is the one a sandbox made on demand has; and no
pooled sandbox outlives its service.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from kernel_helpers import KERNEL_NAME, run_cell, service_env, start_kernel, stop_kernel
from service_helpers import (
    LocalService,
    create_sandbox,
    destroy_sandbox,
    host_pids_of,
    running_local_service,
    wait_until,
)

from modbox_kernel import agent as agent_mod
from modbox_kernel import bootstrap
from modbox_kernel.api import ModboxClient

pytestmark = [pytest.mark.timeout(180)]

POOL = 2


@pytest.fixture(scope="module")
def pooled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalService]:
    log = Path(tmp_path_factory.mktemp("pooled")) / "service.log"
    with running_local_service(log, "--pool", str(POOL)) as service:
        assert wait_until(lambda: _health(service)["pooled"] == POOL, 60), service.log_text()
        yield service


@pytest.fixture(scope="module")
def unpooled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalService]:
    log = Path(tmp_path_factory.mktemp("unpooled")) / "service.log"
    with running_local_service(log) as service:
        yield service


def _health(service: LocalService) -> dict[str, object]:
    with service.client() as control:
        answer: dict[str, object] = control.get("/health").json()
        return answer


def _pooled_ids(service: LocalService) -> set[str]:
    """Every sandbox the pool made, from the service's log."""
    return set(re.findall(r"sandbox (\S+) \(pool-[0-9a-f]+\) provisioning", service.log_text()))


def _detail(service: LocalService, sandbox_id: str) -> dict[str, object]:
    with service.client() as control:
        answer: dict[str, object] = control.get(f"/sandboxes/{sandbox_id}").json()
        return answer


def test_pooled_sandboxes_are_hidden_until_a_create_takes_one(pooled: LocalService) -> None:
    with pooled.client() as control:
        assert control.get("/sandboxes").json()["sandboxes"] == []
        for sandbox_id in _pooled_ids(pooled):
            assert control.get(f"/sandboxes/{sandbox_id}").status_code == 404
    assert _health(pooled)["sandboxes"] == 0


def test_a_create_gets_a_ready_agent_and_its_key(pooled: LocalService) -> None:
    waiting = _pooled_ids(pooled)
    key = "pool-probe-key-" + "k" * 16
    sandbox = create_sandbox(pooled, task_id="takes-one", env_vars={"SANDBOX_API_KEY": key})
    try:
        assert sandbox.id in waiting, "the create did not take a pooled sandbox"
        detail = _detail(pooled, sandbox.id)
        assert detail["name"] == "takes-one"
        advert = detail["agent"]
        assert isinstance(advert, dict) and advert["version"] == agent_mod.AGENT_VERSION
        # Later commands see the creator's key…
        assert sandbox.exec("echo $SANDBOX_API_KEY")["stdout"] == key + "\n"
        # …and so does the agent's Python, which a cell would run in.
        code = "import os; print(os.environ['SANDBOX_API_KEY'])"
        cell = {"op": "execute", "id": "c1", "code": code, "wait": 10, "since": 0}
        ran = sandbox.exec(agent_mod.request_command(advert["state_dir"], cell))
        answer = json.loads(ran["stdout"])
        texts = [e.get("text", "") for e in answer["events"] if e.get("type") == "stream"]
        assert "".join(texts) == key + "\n"
        # After a cell the agent is no longer pristine: it refuses a second handover's
        # environment, and says so to a kernel that would adopt it.
        refused = sandbox.exec(
            agent_mod.request_command(advert["state_dir"], {"op": "environ", "set": {"X": "1"}})
        )
        assert json.loads(refused["stdout"])["ok"] is False
        info = sandbox.exec(agent_mod.request_command(advert["state_dir"], {"op": "info"}))
        assert json.loads(info["stdout"])["reply"]["pristine"] is False
    finally:
        destroy_sandbox(sandbox)
    # The pool makes a replacement for the one taken.
    assert wait_until(lambda: _health(pooled)["pooled"] == POOL, 60)


def test_other_env_vars_get_a_sandbox_made_for_them(pooled: LocalService) -> None:
    # An agent reads some variables when it starts (PYTHONPATH, the locale): a create
    # with variables beyond the key gets a new jail, its variables everywhere.
    waiting = _pooled_ids(pooled)
    sandbox = create_sandbox(pooled, env_vars={"POOL_PROBE": "given"})
    try:
        assert sandbox.id not in waiting
        assert "agent" not in _detail(pooled, sandbox.id)
        assert sandbox.exec("echo $POOL_PROBE")["stdout"] == "given\n"
        assert _health(pooled)["pooled"] == POOL
    finally:
        destroy_sandbox(sandbox)


def test_a_kernel_adopts_only_a_pristine_agent_of_its_version(pooled: LocalService) -> None:
    sandbox = create_sandbox(pooled, env_vars={"SANDBOX_API_KEY": "k" * 24})
    try:
        advert = _detail(pooled, sandbox.id)["agent"]

        async def adopt(advert: object) -> object:
            async with ModboxClient(pooled.base_url, pooled.token) as client:
                info = await client.wait_until_running(sandbox.id, timeout=30)
                async with client.runtime(info, "k" * 24) as runtime:
                    return await bootstrap.adopt_agent(runtime, advert)

        assert isinstance(advert, dict)
        adopted = asyncio.run(adopt(advert))
        assert isinstance(adopted, tuple) and adopted[:2] == (
            advert["state_dir"],
            advert["agent_file"],
        )
        assert asyncio.run(adopt({**advert, "version": "0" * 12})) is None
        assert asyncio.run(adopt(None)) is None
        cell = {"op": "execute", "id": "used", "code": "x = 1", "wait": 10, "since": 0}
        sandbox.exec(agent_mod.request_command(advert["state_dir"], cell))
        assert asyncio.run(adopt(advert)) is None, "adopted an agent a cell had reached"
    finally:
        destroy_sandbox(sandbox)


LEAVE_TRACES = """
import os, subprocess
open('left-behind.txt', 'w').write('a')
left_variable = 42
os.environ['LEFT_MARK'] = '1'
left_process = subprocess.Popen(['sleep', '3001'])
print(os.environ['MODBOX_SANDBOX_ID'])
"""

LOOK_FOR_TRACES = """
import os, json
procs = []
for pid in os.listdir('/proc'):
    if pid.isdigit():
        try:
            procs.append(open(f'/proc/{pid}/cmdline', 'rb').read().replace(b'\\0', b' ').decode())
        except OSError:
            pass
print(json.dumps({
    "id": os.environ['MODBOX_SANDBOX_ID'],
    "file": os.path.exists('left-behind.txt'),
    "variable": 'left_variable' in globals(),
    "env": 'LEFT_MARK' in os.environ,
    "process": any('sleep 3001' in p for p in procs),
    "env_keys": sorted(k for k in os.environ if k != 'MODBOX_SANDBOX_ID'),
    "in_history": len(get_ipython().history_manager.input_hist_raw),
}))
"""


@pytest.mark.kernel
def test_a_kernel_after_another_finds_nothing_of_it(
    pooled: LocalService, unpooled: LocalService
) -> None:
    env = service_env(pooled.base_url, pooled.token)
    km, kc = start_kernel(KERNEL_NAME, env)
    try:
        first = run_cell(kc, LEAVE_TRACES)
        assert first.status == "ok", first.describe()
        first_id = first.stdout.strip()
    finally:
        stop_kernel(km, kc)

    def traces(service: LocalService) -> dict[str, object]:
        km, kc = start_kernel(KERNEL_NAME, service_env(service.base_url, service.token))
        try:
            run = run_cell(kc, LOOK_FOR_TRACES)
            assert run.status == "ok", run.describe()
            found: dict[str, object] = json.loads(run.stdout)
            return found
        finally:
            stop_kernel(km, kc)

    later = traces(pooled)
    assert later["id"] != first_id
    assert later["id"] in _pooled_ids(pooled), "the second kernel did not take a pooled sandbox"
    assert {k: later[k] for k in ("file", "variable", "env", "process")} == dict.fromkeys(
        ("file", "variable", "env", "process"), False
    )
    # The environment and history are those of a sandbox made on demand for a kernel.
    on_demand = traces(unpooled)
    assert later["env_keys"] == on_demand["env_keys"]
    assert later["in_history"] == on_demand["in_history"]


def test_no_pooled_sandbox_outlives_its_service(tmp_path: Path) -> None:
    with running_local_service(tmp_path / "service.log", "--pool", "2") as service:
        assert wait_until(lambda: _health(service)["pooled"] == 2, 60), service.log_text()
        ids = _pooled_ids(service)
        assert len(ids) == 2
        # "pooled" counts sandboxes still being prepared too: wait for their processes.
        assert wait_until(lambda: all(host_pids_of(i) for i in ids), 30), service.log_text()
        service.process.send_signal(signal.SIGTERM)
        service.process.wait(10)
    assert wait_until(lambda: not any(host_pids_of(i) for i in ids), 10)


def test_the_agent_route_relays_a_request_and_names_a_missing_agent(pooled: LocalService) -> None:
    sandbox = create_sandbox(pooled)
    try:
        advert = _detail(pooled, sandbox.id)["agent"]
        assert isinstance(advert, dict)
        url = sandbox.exec_url.rsplit("/", 1)[0] + "/agent"
        with pooled.client() as control:
            caps = control.get(f"/sandboxes/{sandbox.id}").json()["capabilities"]
        assert caps["agent"] == url
        cell = {"op": "execute", "id": "r1", "code": "print(6 * 7)", "wait": 10, "since": 0}
        request = agent_mod.encode_request(cell)
        body = {"state_dir": advert["state_dir"], "request": request}
        answered = sandbox.http.post(url, json=body)
        assert answered.status_code == 200, answered.text
        events = answered.json()["events"]
        assert "".join(e.get("text", "") for e in events if e["type"] == "stream") == "42\n"
        # The same request by exec gives the same events (the route is the bash line's twin).
        again = {**cell, "id": "r1"}  # a resent execute is a poll: same events
        line = sandbox.exec(agent_mod.request_command(advert["state_dir"], again))["stdout"]
        assert json.loads(line)["events"] == events
        # No agent in that folder: a sentence, not a hang.
        missing = sandbox.http.post(url, json={"state_dir": "/tmp", "request": request})
        assert missing.status_code == 409
        assert missing.json()["error"]["code"] == "agent_unreachable"
        assert "No agent answers in /tmp" in missing.json()["error"]["message"]
        # Malformed bodies get the envelope; no token gets 401.
        bad = sandbox.http.post(url, json={"state_dir": advert["state_dir"], "request": "a\nb"})
        assert bad.status_code == 422 and "request" in bad.text
        assert sandbox.http.post(url, json={"request": request}).status_code == 422
        assert httpx.post(url, json={"state_dir": "/", "request": request}).status_code == 401
    finally:
        destroy_sandbox(sandbox)
