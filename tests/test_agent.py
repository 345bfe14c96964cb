"""The in-sandbox agent, driven exactly as the session drives it, without a sandbox.

Each agent is a real daemon started with ``start_command(...)`` and every request is
the real ``request_command(...)`` bash line run with ``bash -c``: base64 payloads,
``/dev/tcp``, the token file, the ``@file`` upload path. Most tests share one
IPython-mode agent (cells get unique ids); tests that need a fresh namespace or a
different mode start their own. Every agent is shut down and its pid checked gone.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import itertools
import json
import marshal
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from service_helpers import wait_until

from modbox_kernel import protocol
from modbox_kernel.agent import (
    AGENT_VERSION,
    INLINE_LIMIT,
    UNREACHABLE_EXIT,
    agent_artifact,
    agent_file_name,
    build_agent,
    encode_request,
    request_command,
    source_version,
    start_command,
)
from modbox_kernel.agent.inside.wire import MAX_RESPONSE_BYTES

pytestmark = pytest.mark.timeout(120)

_BUILT: list[str] = []


def built_agent() -> str:
    """The agent artifact the session uploads, written once to a file of this run."""
    if not _BUILT:
        folder = tempfile.mkdtemp(prefix="modbox-agent-test-")
        path = os.path.join(folder, agent_file_name())
        with open(path, "wb") as f:
            f.write(agent_artifact())
        _BUILT.append(path)
    return _BUILT[0]


def _bash(command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, timeout=timeout, check=False
    )


class AgentUnderTest:
    """One agent daemon plus the helpers the tests use to talk to it."""

    def __init__(self, root: Path, *, env: dict[str, str] | None = None, python: str = "") -> None:
        self.state_dir = str(root / "state")
        home = root / "home"
        home.mkdir(parents=True, exist_ok=True)
        self.env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
        self.env["HOME"] = str(home)
        self.env.update(env or {})
        self.python = python or sys.executable
        self.counter = itertools.count(1)
        self.info: dict[str, Any] = {}

    def start(self) -> dict[str, Any]:
        command = start_command(built_agent(), self.state_dir, python=self.python)
        proc = subprocess.run(
            ["bash", "-c", command],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=30,
            check=False,
        )
        assert proc.returncode == 0, (proc.stdout, proc.stderr)
        lines = proc.stdout.splitlines()
        assert len(lines) == 1, proc.stdout
        self.info = json.loads(lines[0])
        return self.info

    def request(self, payload: dict[str, Any] | None = None, *, ref: str | None = None) -> Any:
        proc = _bash(request_command(self.state_dir, payload, ref=ref))
        assert proc.returncode == 0, (proc.returncode, proc.stderr)
        return json.loads(proc.stdout)

    def execute_payload(self, code: str, **fields: Any) -> dict[str, Any]:
        """An ``execute`` request as the session sends it (the kernel numbers cells)."""
        cell = protocol.CellRequest(code=code, execution_count=next(self.counter))
        payload = protocol.execute_request(cell, wait=2.0)
        payload.update(fields)
        # Like a kernel, never hand out a count below one a test chose itself.
        self.counter = itertools.count(max(next(self.counter), payload["execution_count"] + 1))
        return payload

    def execute(self, code: str, *, timeout: float = 60, **fields: Any) -> list[dict[str, Any]]:
        """Submit a cell, poll until ``done``, check the cursor, return all events."""
        payload = self.execute_payload(code, **fields)
        return self.collect(payload["id"], self.request(payload), timeout=timeout)

    def collect(
        self, cid: str, resp: dict[str, Any], *, since: int = 0, timeout: float = 60
    ) -> list[dict[str, Any]]:
        """Poll from ``resp`` (the answer to a request that started at ``since``) to done."""
        events: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while True:
            assert resp["ok"], resp
            events.extend(resp["events"])
            if resp["done"]:
                break
            assert time.monotonic() < deadline, f"cell did not finish: {events}"
            resp = self.request(protocol.poll_request(cid, since=resp["next"], wait=2.0))
        # The cursor: every event exactly once, numbered consecutively, `done` last.
        assert [e["seq"] for e in events] == list(range(since, since + len(events)))
        assert events[-1]["type"] == "done"
        assert [e["type"] for e in events].count("done") == 1
        return events

    def resume(self, cid: str, resp: dict[str, Any], **poll: Any) -> list[dict[str, Any]]:
        """The events after ``resp`` (an answer that did not end cell ``cid``), to ``done``."""
        since = resp["next"]
        first = self.request({"op": "poll", "id": cid, "since": since, **poll})
        return self.collect(cid, first, since=since)

    def until_input_request(
        self, cid: str, resp: dict[str, Any]
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Poll on from ``resp`` until cell ``cid`` asks for input: (last answer, events)."""
        events = list(resp["events"])
        while not of_type(events, "input_request"):
            resp = self.request(protocol.poll_request(cid, since=resp["next"], wait=2.0))
            events += resp["events"]
        return resp, events

    def stop(self) -> None:
        pid = self.info.get("pid")
        if os.path.exists(os.path.join(self.state_dir, "port")):
            _bash(request_command(self.state_dir, protocol.shutdown_request()), timeout=10)
        if pid:
            _wait_gone(pid, kill=True)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(pid: int, *, kill: bool, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    if _alive(pid) and kill:
        os.kill(pid, 9)
        return False
    return not _alive(pid)


def stdout_of(events: list[dict[str, Any]], name: str = "stdout") -> str:
    return "".join(e["text"] for e in events if e["type"] == "stream" and e["name"] == name)


def of_type(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == kind]


@pytest.fixture(scope="module")
def ipy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentUnderTest]:
    agent = AgentUnderTest(tmp_path_factory.mktemp("agent-ipython"))
    agent.start()
    yield agent
    agent.stop()


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentUnderTest]:
    agent = AgentUnderTest(
        tmp_path_factory.mktemp("agent-fallback"), env={"MODBOX_AGENT_NO_IPYTHON": "1"}
    )
    agent.start()
    yield agent
    agent.stop()


@pytest.fixture(params=["ipython", "fallback"])
def both(request: pytest.FixtureRequest) -> AgentUnderTest:
    agent: AgentUnderTest = request.getfixturevalue(
        "ipy" if request.param == "ipython" else "plain"
    )
    return agent


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[AgentUnderTest]:
    agent = AgentUnderTest(tmp_path)
    agent.start()
    yield agent
    agent.stop()


# --------------------------------------------------------------------------- start


def test_start_reports_itself_and_writes_private_files(fresh: AgentUnderTest) -> None:
    info = fresh.info
    assert info["ok"] is True
    assert info["pid"] != os.getpid() and _alive(info["pid"])
    assert info["implementation"] == "cpython"
    assert info["python_version"] == ".".join(map(str, sys.version_info[:3]))
    assert info["ipython_version"]  # IPython is installed beside the tests
    assert info["agent_version"] == AGENT_VERSION
    state = Path(fresh.state_dir)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "token").stat().st_mode) == 0o600
    assert int((state / "port").read_text()) == info["port"]
    reply = fresh.request(protocol.query("info"))["reply"]
    assert reply["pid"] == info["pid"] and reply["port"] == info["port"]
    # The same requests on the state directory's socket (the local service's way in).
    sock = state / "agent.sock"
    assert stat.S_ISSOCK(sock.lstat().st_mode) and stat.S_IMODE(sock.lstat().st_mode) == 0o600
    assert [p.name for p in state.iterdir() if p.name.startswith(".agent.sock")] == []
    token = (state / "token").read_text().strip()
    assert (
        _ask_socket(sock, f"{token} {encode_request(protocol.query('info'))}")["reply"]["pid"]
        == info["pid"]
    )
    assert _ask_socket(sock, f"wrong {encode_request(protocol.query('info'))}") == {
        "ok": False,
        "error": "bad token",
    }


def _ask_socket(path: Path, line: str) -> Any:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        sock.sendall(line.encode() + b"\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return json.loads(data)


def test_start_again_replaces_the_running_agent(fresh: AgentUnderTest) -> None:
    fresh.execute("marker = 41")
    first = fresh.info["pid"]
    second = fresh.start()["pid"]
    assert second != first
    assert _wait_gone(first, kill=False), "the old agent survived a restart"
    events = fresh.execute("'marker' in dir()")
    assert of_type(events, "execute_result")[0]["data"]["text/plain"] == "False"


def _start_fails(state_dir: Path) -> dict[str, Any]:
    command = start_command(built_agent(), str(state_dir), python=sys.executable)
    proc = _bash(command, timeout=40)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    (line,) = proc.stdout.splitlines()
    answer: dict[str, Any] = json.loads(line)
    assert answer["ok"] is False
    return answer


def test_start_reports_an_unusable_state_dir(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    answer = _start_fails(tmp_path / "a-file" / "state")
    assert "cannot prepare" in answer["error"]


def test_start_reports_a_daemon_that_dies_while_starting(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "agent.log").mkdir(parents=True)  # the daemon cannot open its log
    answer = _start_fails(state)
    assert "could not start" in answer["error"] and "agent.log" in answer["error"]


def test_unreachable_agent_exits_97(tmp_path: Path) -> None:
    proc = _bash(request_command(str(tmp_path / "nothing-here"), protocol.query("info")))
    assert proc.returncode == UNREACHABLE_EXIT
    assert "modbox-agent: unreachable" in proc.stderr


def test_wrong_token_is_refused(ipy: AgentUnderTest) -> None:
    port = Path(ipy.state_dir, "port").read_text().strip()
    command = (
        f'exec 3<>/dev/tcp/127.0.0.1/{port} && printf "%s %s\\n" wrong '
        f"{encode_request({'op': 'info'})} >&3 && cat <&3"
    )
    proc = _bash(command)
    assert json.loads(proc.stdout) == {"ok": False, "error": "bad token"}


def test_shutdown_ends_the_process_and_removes_its_files(tmp_path: Path) -> None:
    agent = AgentUnderTest(tmp_path)
    pid = agent.start()["pid"]
    try:
        assert agent.request({"op": "shutdown"}) == {"ok": True}
        assert _wait_gone(pid, kill=False)
        assert not Path(agent.state_dir, "port").exists()
        assert not Path(agent.state_dir, "token").exists()
        assert not Path(agent.state_dir, "agent.sock").exists()
    finally:
        agent.stop()


# ------------------------------------------------------------- basic shapes (both modes)


def test_print_is_a_stdout_stream(both: AgentUnderTest) -> None:
    events = both.execute("print('hello, world')")
    assert [e["type"] for e in events] == ["stream", "done"]
    assert events[0]["name"] == "stdout" and events[0]["text"] == "hello, world\n"
    assert events[-1]["status"] == "ok"


def test_expression_is_an_execute_result_with_the_kernels_count(both: AgentUnderTest) -> None:
    events = both.execute("6 * 7", execution_count=1234)
    results = of_type(events, "execute_result")
    assert len(results) == 1
    assert results[0]["data"]["text/plain"] == "42"
    assert results[0]["execution_count"] == 1234
    assert results[0]["metadata"] == {}
    assert events[-1]["execution_count"] == 1234


def test_state_persists_across_cells(both: AgentUnderTest) -> None:
    both.execute("import math\nradius = 2")
    events = both.execute("print(round(math.pi * radius**2, 3))")
    assert stdout_of(events) == "12.566\n"


def test_error_is_exactly_one_error_event_and_a_failed_done(both: AgentUnderTest) -> None:
    events = both.execute("1 / 0")
    assert [e["type"] for e in events] == ["error", "done"]
    error, done = events
    assert error["ename"] == "ZeroDivisionError"
    assert error["evalue"] == "division by zero"
    assert error["traceback"] and all(isinstance(line, str) for line in error["traceback"])
    assert done["status"] == "error"
    assert (done["ename"], done["evalue"]) == ("ZeroDivisionError", "division by zero")
    assert done["traceback"] == error["traceback"]


def test_syntax_error_is_an_error(both: AgentUnderTest) -> None:
    events = both.execute("def broken(:\n    pass")
    assert [e["type"] for e in events] == ["error", "done"]
    assert events[0]["ename"] == "SyntaxError"


def test_rich_repr_is_in_the_execute_result(both: AgentUnderTest) -> None:
    code = (
        "class Rich:\n"
        "    def __repr__(self): return 'Rich()'\n"
        "    def _repr_html_(self): return '<b>rich</b>'\n"
        "Rich()"
    )
    (result,) = of_type(both.execute(code), "execute_result")
    assert result["data"] == {"text/plain": "Rich()", "text/html": "<b>rich</b>"}


def test_input_without_stdin_raises_stdin_not_implemented(both: AgentUnderTest) -> None:
    events = both.execute("input('name? ')", allow_stdin=False)
    assert [e["type"] for e in events] == ["error", "done"]
    assert events[0]["ename"] == "StdinNotImplementedError"
    assert events[0]["evalue"] == (
        "raw_input was called, but this frontend does not support input requests."
    )


def test_input_round_trip(both: AgentUnderTest) -> None:
    code = "name = input('name? ')\nprint('hello', name)"
    payload = both.execute_payload(code, allow_stdin=True)
    cid = payload["id"]
    resp = both.request(payload)
    assert not resp["done"]
    resp, events = both.until_input_request(cid, resp)
    (req,) = of_type(events, "input_request")
    assert req["prompt"] == "name? " and req["password"] is False
    assert both.request(protocol.input_reply(cid, "Ada")) == {"ok": True}
    events += both.resume(cid, resp)
    assert stdout_of(events) == "hello Ada\n"
    assert events[-1]["status"] == "ok"


def test_completion_inspection_and_is_complete(both: AgentUnderTest) -> None:
    both.execute("import os\nsome_long_variable_name = 1")
    reply = both.request({"op": "complete", "code": "x = some_long_v", "cursor_pos": 15})["reply"]
    assert reply["matches"] == ["some_long_variable_name"]
    assert (reply["cursor_start"], reply["cursor_end"]) == (4, 15)
    reply = both.request({"op": "complete", "code": "os.pa", "cursor_pos": 5})["reply"]
    # IPython replaces "pa", the fallback "os.pa": either way the result is os.path.
    edits = {"os.pa"[: reply["cursor_start"]] + m for m in reply["matches"]}
    assert "os.path" in edits and reply["cursor_end"] == 5

    reply = both.request({"op": "inspect", "code": "len(", "cursor_pos": 2})["reply"]
    assert reply["found"] is True and "text/plain" in reply["data"]
    reply = both.request({"op": "inspect", "code": "no_such_name_here", "cursor_pos": 3})
    assert reply["reply"]["found"] is False

    def status(code: str) -> dict[str, Any]:
        result: dict[str, Any] = both.request({"op": "is_complete", "code": code})["reply"]
        return result

    assert status("x = 1")["status"] == "complete"
    assert status("for i in range(3):") == {"status": "incomplete", "indent": "    "}
    assert status("1 = = 2")["status"] == "invalid"


def test_history_tail_range_and_search(both: AgentUnderTest) -> None:
    marker = uuid.uuid4().hex[:8]
    code = f"history_marker_{marker} = 1"
    both.execute(code)
    both.execute(code)
    tail = both.request({"op": "history", "hist_access_type": "tail", "n": 1, "raw": True})
    (entry,) = tail["reply"]["history"]
    session, line, source = entry
    assert source == code
    with_output = both.request(
        {"op": "history", "hist_access_type": "tail", "n": 1, "raw": True, "output": True}
    )["reply"]["history"]
    assert with_output[0][2][0] == code and len(with_output[0][2]) == 2
    ranged = both.request(
        {
            "op": "history",
            "hist_access_type": "range",
            "session": session,
            "start": line,
            "stop": line + 1,
            "raw": True,
        }
    )["reply"]["history"]
    # (IPython calls the current session 0 in a tail and by number in a range.)
    assert [entry[1:] for entry in ranged] == [[line, code]]
    pattern = f"history_marker_{marker}*"
    search = {"op": "history", "hist_access_type": "search", "pattern": pattern, "raw": True}
    assert len(both.request(search)["reply"]["history"]) == 2
    assert len(both.request({**search, "unique": True})["reply"]["history"]) == 1


def test_resent_execute_never_runs_twice(both: AgentUnderTest) -> None:
    both.execute("runs = 0")
    payload = both.execute_payload("runs += 1\nprint(runs)", wait=5.0)
    first = both.request(payload)
    again = both.request(payload)
    assert first["done"] and again["done"]
    assert again["events"] == first["events"]  # the same events, nothing new
    assert stdout_of(first["events"]) == "1\n"
    assert stdout_of(both.execute("print(runs)")) == "1\n"


def test_interrupt_stops_a_sleeping_cell_and_keeps_the_namespace(both: AgentUnderTest) -> None:
    both.execute("survivor = 'still here'")
    code = "import time\nprint('sleeping')\ntime.sleep(30)"
    payload = both.execute_payload(code, wait=0.5)
    cid = payload["id"]
    resp = both.request(payload)
    assert not resp["done"]
    started = time.monotonic()
    assert both.request(protocol.interrupt_request(cid)) == {"ok": True, "delivered": True}
    events = resp["events"] + both.resume(cid, resp, wait=5.0)
    assert time.monotonic() - started < 3
    assert stdout_of(events) == "sleeping\n"
    assert [e["ename"] for e in of_type(events, "error")] == ["KeyboardInterrupt"]
    assert events[-1]["status"] == "error"
    assert stdout_of(both.execute("print(survivor)")) == "still here\n"


def test_a_first_cell_and_the_completion_warm_up_do_not_block_each_other(
    fresh: AgentUnderTest,
) -> None:
    # The first completion starts jedi's warm-up; once the agent has been quiet for
    # half a second it imports jedi on a background thread, and it steps aside
    # whenever a cell runs. A cell that needs what that thread might hold (the import
    # locks of jedi's and parso's modules, logging's lock) must not hang, and
    # completion must answer meanwhile.
    fresh.request({"op": "complete", "code": "pri", "cursor_pos": 3})
    time.sleep(0.55)
    code = (
        "import importlib, logging\n"
        "for name in ('jedi', 'parso', 'jedi.api.completion', 'parso.python.diff'):\n"
        "    importlib.import_module(name)\n"
        "logging.getLogger('parso').warning('logged')\n"
        "print('ran')"
    )
    assert stdout_of(fresh.execute(code, timeout=30)) == "ran\n"
    reply = fresh.request({"op": "complete", "code": "import o", "cursor_pos": 8})["reply"]
    assert "os" in reply["matches"], reply


def test_the_first_tab_is_answered_at_once_and_jedi_takes_over_once_warm(
    tmp_path: Path,
) -> None:
    # jedi's first completion costs 1-2 s in a fresh sandbox (an empty parso cache),
    # longer than JupyterLab waits for an answer (1 s). Until the warm-up has done it,
    # IPython's own matchers answer; once it has, jedi does (its types say which).
    agent = AgentUnderTest(tmp_path, env={"XDG_CACHE_HOME": str(tmp_path / "empty-cache")})
    agent.start()
    try:
        agent.execute("import collections")
        request = protocol.query("complete", code="collections.Ord", cursor_pos=15)
        started = time.monotonic()
        reply = agent.request(request)["reply"]
        took = time.monotonic() - started
        assert took < 1.0, f"the first completion took {took:.2f} s"
        edits = {"collections.Ord"[: reply["cursor_start"]] + m for m in reply["matches"]}
        assert "collections.OrderedDict" in edits, reply

        def jedi_answers() -> bool:
            types = agent.request(request)["reply"]["metadata"]["_jupyter_types_experimental"]
            return [t["type"] for t in types] == ["class"]

        assert wait_until(jedi_answers, 30, 0.7), "jedi never took over after the warm-up"
    finally:
        agent.stop()


def test_interrupt_reaches_a_child_process(both: AgentUnderTest) -> None:
    # os.system ignores SIGINT in the caller; as under the local kernel the child dies
    # and the cell goes on.
    payload = both.execute_payload("import os\nos.system('sleep 30')\nprint('after')", wait=0.5)
    cid = payload["id"]
    resp = both.request(payload)
    time.sleep(0.3)  # let the child start
    started = time.monotonic()
    assert both.request(protocol.interrupt_request(cid))["delivered"] is True
    events = resp["events"] + both.resume(cid, resp, wait=5.0)
    assert time.monotonic() - started < 3
    assert stdout_of(events) == "after\n"


def test_interrupt_of_a_queued_cell_keeps_it_from_running(both: AgentUnderTest) -> None:
    both.execute("queued_ran = False")
    first = both.execute_payload("import time\ntime.sleep(30)", wait=0.3)
    second = both.execute_payload("queued_ran = True", wait=0.0)
    both.request(first)
    both.request(second)
    assert both.request(protocol.interrupt_request(second["id"]))["delivered"] is True
    assert both.request(protocol.interrupt_request(first["id"]))["delivered"] is True
    for payload in (first, second):
        cid = payload["id"]
        events = both.collect(cid, both.request({"op": "poll", "id": cid, "wait": 5.0}))
        assert [e["ename"] for e in of_type(events, "error")] == ["KeyboardInterrupt"]
    assert stdout_of(both.execute("print(queued_ran)")) == "False\n"


def test_interrupt_ends_an_input_wait(both: AgentUnderTest) -> None:
    payload = both.execute_payload("input('?')", allow_stdin=True, wait=0.5)
    cid = payload["id"]
    resp = both.request(payload)
    assert of_type(resp["events"], "input_request")
    assert both.request(protocol.interrupt_request(cid))["delivered"] is True
    events = resp["events"] + both.resume(cid, resp, wait=5.0)
    assert [e["ename"] for e in of_type(events, "error")] == ["KeyboardInterrupt"]
    assert stdout_of(both.execute("print('alive')")) == "alive\n"


def test_hostile_source_runs_verbatim(both: AgentUnderTest, tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    # Shell metacharacters, quotes, backslashes, an escaped NUL, \r and emoji.
    literal = f"`id` $(touch {canary}) ${{HOME}} 'single' \"double\" \\\\ a\\0b\\r 🎉 ünï"
    code = f'print("""{literal}""", end="")'
    expected = f"`id` $(touch {canary}) ${{HOME}} 'single' \"double\" \\ a\x00b\r 🎉 ünï"
    events = both.execute(code)
    assert stdout_of(events) == expected
    assert not canary.exists()


def test_large_cell_goes_through_an_uploaded_request_file(both: AgentUnderTest) -> None:
    big = "x" * 500_000
    code = f"big = '{big}'\nprint(len(big), big[:3])"
    payload = both.execute_payload(code, wait=10.0)
    cid = payload["id"]
    assert len(encode_request(payload)) > INLINE_LIMIT
    ref = Path(both.state_dir).parent / f"modbox-req-{uuid.uuid4()}.json"
    ref.write_text(json.dumps(payload))
    events = both.collect(cid, both.request(ref=str(ref)))
    assert stdout_of(events) == "500000 xxx\n"
    assert not ref.exists(), "the agent must delete the request file"


def test_output_flood_is_coalesced_and_exact(both: AgentUnderTest) -> None:
    events = both.execute("for i in range(5000):\n    print(i)")
    streams = of_type(events, "stream")
    assert stdout_of(events) == "".join(f"{i}\n" for i in range(5000))
    assert len(streams) < 50, f"{len(streams)} stream events for one flood"


def test_large_output_is_split_across_responses(both: AgentUnderTest) -> None:
    code = "import sys\nfor i in range(100):\n    sys.stdout.write(str(i % 10) * 100_000)"
    payload = both.execute_payload(code, wait=10.0)
    cid = payload["id"]
    resp = both.request(payload)
    sizes = []
    events: list[dict[str, Any]] = []
    while True:
        sizes.append(len(json.dumps(resp)))
        events += resp["events"]
        if resp["done"]:
            break
        resp = both.request(protocol.poll_request(cid, since=resp["next"], wait=2.0))
    assert len(sizes) > 2 and max(sizes) < 1.2 * MAX_RESPONSE_BYTES
    assert stdout_of(events) == "".join(str(i % 10) * 100_000 for i in range(100))


def test_output_after_an_answer_cut_at_its_size_bound_is_kept(both: AgentUnderTest) -> None:
    # Five 1 MB writes fill more than one answer: the answer taken during the pause
    # stops at its bound, with the last event left behind. Text written after the
    # pause must still arrive, and the cell must finish.
    code = (
        "import sys, time\n"
        "for _ in range(5):\n"
        "    sys.stdout.write('a' * 1_000_000)\n"
        "    sys.stdout.flush()\n"
        "time.sleep(1.0)\n"
        "sys.stdout.write('b' * 1000)\n"
        "print('end')\n"
    )
    payload = both.execute_payload(code, wait=0.6)
    cid = payload["id"]
    answer = both.request(payload)
    assert answer.get("more"), "the first answer did not reach its size bound"
    time.sleep(1.5)  # the rest is written while the cut answer's last event waits
    events = list(answer["events"])
    deadline = time.monotonic() + 20
    while not answer["done"]:
        assert time.monotonic() < deadline, "the cell never finished"
        answer = both.request(protocol.poll_request(cid, since=answer["next"], wait=2.0))
        events += answer["events"]
    text = stdout_of(events)
    assert text == "a" * 5_000_000 + "b" * 1000 + "end\n"
    assert next(e for e in events if e["type"] == "done")["status"] == "ok"


def test_a_pipelined_poll_goes_on_where_the_one_before_it_ended(both: AgentUnderTest) -> None:
    # Two polls out at once, as the kernel keeps them: the second names the first
    # (``after``) and answers from where the first ended, while its own ``since`` (what
    # the kernel holds) keeps the first one's events for a resend of the first.
    code = "import time\nfor i in range(6):\n    print(i, flush=True)\n    time.sleep(0.15)"
    payload = both.execute_payload(code, wait=0.0)
    cid = payload["id"]
    first = both.request(payload)
    since = first["next"]
    got = stdout_of(first["events"])
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        a = pool.submit(both.request, protocol.poll_request(cid, since=since, wait=5, rid="a"))
        time.sleep(0.05)
        b = pool.submit(
            both.request, protocol.poll_request(cid, since=since, wait=5, rid="b", after="a")
        )
        answer_a, answer_b = a.result(10), b.result(10)
    assert answer_a["events"] and answer_b["events"]
    assert answer_b["events"][0]["seq"] == answer_a["next"], (answer_a, answer_b)
    got += stdout_of(answer_a["events"]) + stdout_of(answer_b["events"])
    # A resend of "a" (its answer lost on the way) still finds a's events.
    again = both.request(protocol.poll_request(cid, since=since, wait=5, rid="a"))
    assert again["events"][0]["seq"] == answer_a["events"][0]["seq"]
    events = list(again["events"])
    while not again["done"]:
        again = both.request(protocol.poll_request(cid, since=again["next"], wait=5))
        events += again["events"]
    assert stdout_of(events).startswith(stdout_of(answer_a["events"]))
    assert "".join(f"{i}\n" for i in range(6)).startswith(got)


def test_coalesce_holds_a_flood_of_prints_back_but_not_the_first(both: AgentUnderTest) -> None:
    code = "import time\nfor i in range(200):\n    print(i, flush=True)\n    time.sleep(0.001)"
    payload = both.execute_payload(code, wait=0.0)
    cid = payload["id"]
    answer = both.request(payload)
    since, answers, events = answer["next"], 0, list(answer["events"])
    started = time.monotonic()
    while not answer["done"]:
        poll = protocol.poll_request(cid, since=since, wait=5, rid=f"r{answers}", coalesce=0.05)
        answer = both.request(poll)
        since, answers = answer["next"], answers + 1
        events += answer["events"]
    elapsed = time.monotonic() - started
    assert stdout_of(events) == "".join(f"{i}\n" for i in range(200))
    # About one answer per 50 ms (a few more at the edges), not one per print.
    assert answers <= elapsed / 0.05 + 4, (answers, elapsed)


def test_c_level_and_subprocess_output_is_captured(both: AgentUnderTest) -> None:
    code = (
        "import os, subprocess\n"
        "print('py')\n"
        "os.write(1, b'raw\\n')\n"
        "os.system('echo from-system')\n"
        "subprocess.run(['echo', 'from-subprocess'])\n"
        "os.write(2, b'raw-err\\n')\n"
        "party = '🎉'.encode()\n"
        "os.write(1, party[:2]); os.write(1, party[2:] + b'\\xff\\n')"
    )
    events = both.execute(code)
    # A character split across two writes stays whole; an invalid byte becomes U+FFFD.
    assert stdout_of(events) == "py\nraw\nfrom-system\nfrom-subprocess\n🎉\ufffd\n"
    assert stdout_of(events, "stderr") == "raw-err\n"


def test_output_between_cells_goes_to_the_background_log(both: AgentUnderTest) -> None:
    """Not the next cell's: the kernel's waiting poll publishes it (op ``background``)."""
    first = both.request(protocol.background_request(since=0, wait=0))
    since, epoch = first["next"], first["epoch"]
    marker = uuid.uuid4().hex
    both.execute(f"import subprocess\nsubprocess.Popen('sleep 0.3; echo {marker}', shell=True)")
    started = time.monotonic()
    answer = both.request(protocol.background_request(since=since, wait=10))
    assert time.monotonic() - started < 5  # answered when the text came, not at the wait
    assert answer["epoch"] == epoch
    assert stdout_of(answer["events"]) == f"{marker}\n"
    assert stdout_of(both.execute("print('next')")) == "next\n"
    again = both.request(protocol.background_request(since=answer["next"], wait=0))
    assert again["events"] == []


def test_user_expressions(both: AgentUnderTest) -> None:
    events = both.execute("base = 20", user_expressions={"answer": "base + 22", "bad": "1/0"})
    done = events[-1]
    assert done["user_expressions"]["answer"]["status"] == "ok"
    assert done["user_expressions"]["answer"]["data"]["text/plain"] == "42"
    assert done["user_expressions"]["bad"]["status"] == "error"


def test_silent_cell_shows_no_result(both: AgentUnderTest) -> None:
    events = both.execute("1 + 1", silent=True, store_history=False)
    assert [e["type"] for e in events] == ["done"]


# --------------------------------------------------------------------------- IPython mode


def test_display_update_and_clear_output(ipy: AgentUnderTest) -> None:
    code = (
        "from IPython.display import display, clear_output\n"
        "h = display('first', display_id=True)\n"
        "h.update('second')\n"
        "clear_output(wait=True)"
    )
    events = ipy.execute(code)
    kinds = [e["type"] for e in events]
    assert kinds == ["display_data", "update_display_data", "clear_output", "done"]
    shown, updated, cleared, _ = events
    assert shown["data"] == {"text/plain": "'first'"} and updated["data"] == {
        "text/plain": "'second'"
    }
    display_id = shown["transient"]["display_id"]
    assert display_id and updated["transient"]["display_id"] == display_id
    assert shown["metadata"] == {} and updated["metadata"] == {}
    assert cleared["wait"] is True


def test_print_before_display_keeps_its_order(ipy: AgentUnderTest) -> None:
    code = (
        "import os\nprint('before')\nos.write(1, b'c-level\\n')\ndisplay('shown')\nprint('after')"
    )
    events = ipy.execute(code)
    assert [(e["type"], e.get("text")) for e in events[:-1]] == [
        ("stream", "before\nc-level\n"),
        ("display_data", None),
        ("stream", "after\n"),
    ]


def test_shell_escape_output_is_stdout(ipy: AgentUnderTest) -> None:
    events = ipy.execute("!echo hi")
    assert stdout_of(events).replace("\r\n", "\n") == "hi\n"
    assert events[-1]["status"] == "ok"


def test_matplotlib_plot_becomes_png_display_data(ipy: AgentUnderTest) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib is part of the [test] extra")
    events = ipy.execute("import matplotlib.pyplot as plt\nplt.plot([1, 3, 2]);")
    (shown,) = of_type(events, "display_data")
    png = base64.b64decode(shown["data"]["image/png"])
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert "text/plain" in shown["data"]
    events = ipy.execute("%matplotlib inline\nplt.figure()\nplt.bar([1, 2], [3, 4]);")
    assert [e["type"] for e in events] == ["display_data", "done"]
    assert "image/png" in events[0]["data"]


def test_pandas_dataframe_has_html(ipy: AgentUnderTest) -> None:
    pytest.importorskip("pandas", reason="pandas is part of the [test] extra")
    events = ipy.execute("import pandas as pd\npd.DataFrame({'a': [1, 2]})")
    (result,) = of_type(events, "execute_result")
    assert "<table" in result["data"]["text/html"]
    assert "a" in result["data"]["text/plain"]


def test_question_mark_goes_to_the_pager_payload(ipy: AgentUnderTest) -> None:
    events = ipy.execute("print?")
    assert [e["type"] for e in events] == ["done"]
    (page,) = events[-1]["payload"]
    assert page["source"] == "page" and page["start"] == 0
    assert "print" in page["data"]["text/plain"]


def test_magics(ipy: AgentUnderTest) -> None:
    out = stdout_of(ipy.execute("%timeit -n1 -r1 sum(range(10))"))
    assert "per loop" in out
    out = stdout_of(ipy.execute("%%time\nx_magic = sum(range(10))"))
    assert "Wall time" in out
    assert "x_magic" in stdout_of(ipy.execute("%who"))
    out = stdout_of(ipy.execute("%pip --version"))
    assert out.startswith("pip ")


def test_warnings_go_to_stderr(ipy: AgentUnderTest) -> None:
    events = ipy.execute("import warnings\nwarnings.warn('careful')")
    assert "UserWarning: careful" in stdout_of(events, "stderr")
    assert events[-1]["status"] == "ok"


def test_getpass_is_a_password_request(ipy: AgentUnderTest) -> None:
    code = "import getpass\nsecret = getpass.getpass('pw: ')\nprint(len(secret))"
    payload = ipy.execute_payload(code, allow_stdin=True)
    cid = payload["id"]
    resp, events = ipy.until_input_request(cid, ipy.request(payload))
    assert of_type(events, "input_request")[0] == {
        "seq": of_type(events, "input_request")[0]["seq"],
        "type": "input_request",
        "prompt": "pw: ",
        "password": True,
    }
    ipy.request(protocol.input_reply(cid, "hunter2"))
    events += ipy.resume(cid, resp)
    assert stdout_of(events) == "7\n"


def test_traceback_names_the_cell_and_count(ipy: AgentUnderTest) -> None:
    events = ipy.execute("def f():\n    raise ValueError('bad value')\nf()", execution_count=77)
    (error,) = of_type(events, "error")
    text = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(error["traceback"]))
    assert "Cell In[77]" in text and "bad value" in text


# --------------------------------------------------------------------------- fallback specifics


def test_fallback_reports_no_ipython(plain: AgentUnderTest) -> None:
    assert plain.info["ipython_version"] is None
    assert plain.request(protocol.query("info"))["reply"]["mode"] == "fallback"


def test_fallback_display_and_top_level_await(plain: AgentUnderTest) -> None:
    events = plain.execute("display({'k': 1})\nimport asyncio\nawait asyncio.sleep(0)\n5")
    assert [e["type"] for e in events] == ["display_data", "execute_result", "done"]
    assert events[0]["data"]["text/plain"] == "{'k': 1}"


def _other_pythons() -> list[tuple[tuple[int, int], str]]:
    """CPythons 3.8+ of this machine other than this one (on PATH or in pyenv), oldest
    first. A pyenv shim may exist without an interpreter behind it, so each candidate
    is probed."""
    pyenv = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions"
    found = []
    for minor in range(8, 15):
        if minor == sys.version_info[1]:
            continue
        names = [shutil.which(f"python3.{minor}")]
        names += [str(p) for p in sorted(pyenv.glob(f"3.{minor}.*/bin/python3.{minor}"))]
        for candidate in filter(None, names):
            probe = subprocess.run(
                [candidate, "-c", f"import sys; print(sys.version_info[:2] == (3, {minor}))"],
                capture_output=True,
                text=True,
                check=False,
            )
            if probe.stdout.strip() == "True":
                found.append(((3, minor), candidate))
                break
    return found


def _oldest_python() -> tuple[str, tuple[int, int]]:
    """The oldest working CPython >= 3.8 here, else this one (the agent promises any
    python3 >= 3.8)."""
    version, python = min([(sys.version_info[:2], sys.executable), *_other_pythons()])
    return python, version


def test_agent_artifact_is_built_deterministically() -> None:
    """Two builds give the same bytes; the zip names its version (the hash of its
    sources, which the agent reports) and carries this Python's bytecode for every
    module under ``__pycache__/``, where zipimport itself never looks."""
    first, second = build_agent(), build_agent()
    assert first == second
    assert first == agent_artifact()
    archive = zipfile.ZipFile(io.BytesIO(first))
    names = archive.namelist()
    assert names == sorted(names) and names[0] == "__main__.py"
    assert "modbox_agent/daemon.py" in names and "modbox_agent/core.py" in names
    modules = [n for n in names if n.endswith(".py") and n != "__main__.py"]
    tag = sys.implementation.cache_tag
    assert sorted(n for n in names if n.endswith(".pyc")) == sorted(
        f"modbox_agent/__pycache__/{Path(n).stem}.{tag}.pyc" for n in modules
    )
    assert archive.read("modbox_agent/VERSION").decode() == AGENT_VERSION
    assert AGENT_VERSION in agent_file_name()
    # The version follows the sources, not the bytecode riding along.
    sources = {n: archive.read(n) for n in names if n.endswith(".py")}
    assert source_version(sources) == AGENT_VERSION
    sources["modbox_agent/core.py"] += b"\n"
    assert source_version(sources) != AGENT_VERSION


_PROBE_SOURCE = """\
import sys


def main():
    hooks = [h for h in sys.path_hooks if getattr(h, "__module__", "") == "__main__"]
    print(WHO, main.__code__.co_filename, __file__, len(hooks), sep="|")
    return 0
"""


def _probe_zip(tmp_path: Path) -> Path:
    """An agent-shaped zip whose ``daemon.main`` says whether its bytecode or its
    source ran: its bytecode member is swapped for code that says "bytecode"."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "__init__.py").write_text("")
    (src / "daemon.py").write_text("WHO = 'source'\n" + _PROBE_SOURCE)
    archive = zipfile.ZipFile(io.BytesIO(build_agent(src)))
    members = {n: archive.read(n) for n in archive.namelist()}
    pyc = f"modbox_agent/__pycache__/daemon.{sys.implementation.cache_tag}.pyc"
    other = compile("WHO = 'bytecode'\n" + _PROBE_SOURCE, "elsewhere.py", "exec")
    members[pyc] = members[pyc][:16] + marshal.dumps(other)
    path = tmp_path / "probe.pyz"
    with zipfile.ZipFile(path, "w") as out:
        for name, data in members.items():
            out.writestr(name, data)
    return path


def test_the_zip_runs_the_bytecode_it_carries(tmp_path: Path) -> None:
    """On the Python that built it, the zip's importer (``archive_main.py``) runs the
    carried bytecode; its code objects and ``__file__`` name the source's path (the
    traceback filter needs that), and its path hook is gone once the agent imported."""
    probe = _probe_zip(tmp_path)
    out = subprocess.run(
        [sys.executable, str(probe), "start"], capture_output=True, text=True, timeout=60
    )
    source = f"{probe}/modbox_agent/daemon.py"
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"bytecode|{source}|{source}|0"


def test_the_zip_compiles_its_sources_on_another_python(tmp_path: Path) -> None:
    """Any other Python ignores the carried bytecode and runs the sources, with the
    same file names (before 3.10 through plain zipimport, from 3.10 through ours)."""
    others = _other_pythons()
    if not others:
        pytest.skip("no CPython 3.8+ other than this one on this machine")
    probe = _probe_zip(tmp_path)
    source = f"{probe}/modbox_agent/daemon.py"
    for version, python in others:
        out = subprocess.run([python, str(probe), "start"], capture_output=True, text=True)
        assert out.returncode == 0, (version, out.stderr)
        assert out.stdout.strip() == f"source|{source}|{source}|0", version


def test_built_agent_runs_a_cell_on_the_oldest_python(tmp_path: Path) -> None:
    """The built artifact, not the source folder, on the oldest Python of this machine."""
    python, version = _oldest_python()
    agent = AgentUnderTest(tmp_path, python=python, env={"MODBOX_AGENT_NO_IPYTHON": "1"})
    info = agent.start()
    try:
        assert info["python_version"].startswith(f"{version[0]}.{version[1]}.")
        assert info["agent_version"] == AGENT_VERSION
        events = agent.execute("x = 2\nprint('oldest')\nx * 21")
        assert stdout_of(events) == "oldest\n"
        assert of_type(events, "execute_result")[0]["data"]["text/plain"] == "42"
        errors = agent.execute("import sys\ndef f():\n    1/0\nf()")
        assert [e["type"] for e in errors] == ["error", "done"]
        # The user's traceback shows the cell's frames, none of the agent's zip.
        text = "\n".join(errors[0]["traceback"])
        assert "Cell In[" in text and ".pyz" not in text, text
        # The notebook does not see the agent's zip on sys.path.
        path = agent.execute("print(sys.path[0] == '', any('.pyz' in p for p in sys.path))")
        assert stdout_of(path) == "True False\n"
    finally:
        agent.stop()


def test_profile_startup_files_run_before_the_first_cell(tmp_path: Path) -> None:
    agent = AgentUnderTest(tmp_path, env={"IPYTHONDIR": str(tmp_path / "ipython")})
    startup = tmp_path / "ipython" / "profile_default" / "startup"
    startup.mkdir(parents=True)
    (startup / "00-first.py").write_text("from_startup = ['py']\n")
    (startup / "10-second.ipy").write_text("from_startup.append('ipy')\n")
    agent.start()
    try:
        assert stdout_of(agent.execute("print(from_startup)")) == "['py', 'ipy']\n"
        assert agent.execute("%store")[-1]["status"] == "ok"  # storemagic is loaded
    finally:
        agent.stop()
