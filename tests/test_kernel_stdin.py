"""execute_request options a frontend sets: ``allow_stdin``, ``silent``, ``store_history``,
``user_expressions`` (issue 4).

* ``input()`` / ``getpass.getpass()`` in the sandbox become an ``input_request`` on the
  stdin channel when the frontend allows it, and the typed value comes back; an
  interrupt while the prompt is pending ends the cell with ``KeyboardInterrupt``.
* A frontend without stdin (nbclient, papermill) gets an error at once, not a hang:
  checked with a raw client and through nbclient itself.
* ``silent`` runs the code without output; ``store_history=False`` leaves the
  execution count and history alone; ``user_expressions`` are evaluated and returned.

One kernel (jupyter_client, shared local service) serves the module; the nbclient test
starts its own, as nbclient does.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import nbformat
import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from kernel_helpers import (
    KERNEL_NAME,
    CellRun,
    Kernel,
    Kernels,
    env_for_kernel,
    execute_notebook,
    is_modbox,
    pump,
    run_cell,
    submit,
)

pytestmark = pytest.mark.kernel

# nbclient / papermill must see input() fail within this time (issue 4).
NO_STDIN_LIMIT = 2.0
STDIN_ERROR = "{} was called, but this frontend does not support input requests."


@pytest.fixture(scope="module")
def kernel(request: pytest.FixtureRequest, kernels: Kernels) -> Kernel:
    return kernels.start(env_for_kernel(request), warm="import getpass, time")


@pytest.fixture
def kc(kernel: Kernel) -> BlockingKernelClient:
    return kernel.kc


class StdinCell:
    """One execute_request with stdin allowed, its outputs and the input_requests it made."""

    def __init__(self, kc: BlockingKernelClient, code: str) -> None:
        self.kc = kc
        self.run = submit(kc, code, allow_stdin=True)

    def pump(self, until: Callable[[], bool], timeout: float) -> bool:
        return pump(self.kc, self.run, until, timeout, stdin=True)

    def wait_for_prompt(self, count: int = 1) -> dict[str, Any]:
        got = self.pump(lambda: len(self.run.input_requests) >= count, timeout=60)
        assert got, f"no input_request arrived:\n{self.run.describe()}"
        content: dict[str, Any] = self.run.input_requests[count - 1]["content"]
        return content

    def answer(self, value: str, count: int = 1) -> dict[str, Any]:
        """Type ``value`` at the ``count``-th prompt; returns that input_request's content."""
        prompt = self.wait_for_prompt(count)
        self.kc.input(value)
        return prompt

    def finish(self, timeout: float = 60) -> CellRun:
        done = self.pump(lambda: self.run.done, timeout)
        assert done, f"no execute_reply:\n{self.run.describe()}"
        return self.run


# --------------------------------------------------------------------------- stdin


@pytest.mark.timeout(120)
def test_input_round_trip(kc: BlockingKernelClient) -> None:
    cell = StdinCell(kc, "name = input('Your name: ')\nprint(f'hello {name}!')")
    assert cell.answer("Ada Lovelace 🐍 `$(x)`") == {"prompt": "Your name: ", "password": False}
    run = cell.finish()

    assert run.status == "ok", run.describe()
    assert run.stdout.endswith("hello Ada Lovelace 🐍 `$(x)`!\n"), run.describe()
    # The value is a variable in the sandbox like any other.
    after = run_cell(kc, "print(len(name))")
    assert after.stdout == f"{len('Ada Lovelace 🐍 `$(x)`')}\n", after.describe()


@pytest.mark.timeout(120)
def test_two_prompts_in_one_cell(kc: BlockingKernelClient) -> None:
    cell = StdinCell(kc, "a = input('a? ')\nb = input('b? ')\nprint(int(a) * int(b))")
    assert cell.answer("6", 1)["prompt"] == "a? "
    assert cell.answer("7", 2)["prompt"] == "b? "
    run = cell.finish()
    assert run.status == "ok", run.describe()
    assert run.stdout.endswith("42\n"), run.describe()


@pytest.mark.timeout(120)
def test_getpass_asks_for_a_password(kc: BlockingKernelClient) -> None:
    cell = StdinCell(kc, "secret = getpass.getpass('Token: ')\nprint(len(secret), secret[::-1])")
    assert cell.answer("s3cr3t") == {"prompt": "Token: ", "password": True}
    run = cell.finish()

    assert run.status == "ok", run.describe()
    assert run.stdout.endswith("6 t3rc3s\n"), run.describe()
    assert "s3cr3t" not in run.stdout, "the password was echoed"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["message", "signal"])
def test_interrupting_a_pending_input(kernel: Kernel, mode: str) -> None:
    km, kc = kernel.km, kernel.kc
    assert run_cell(kc, f"survivor = {mode!r}").status == "ok"
    cell = StdinCell(kc, "answer = input('never answered: ')\nprint('not reached')")
    cell.wait_for_prompt()

    sent = time.monotonic()
    if mode == "message":
        km.interrupt_kernel()
    else:
        km.signal_kernel(signal.SIGINT)
    run = cell.finish(timeout=30)

    print(f"\n{mode} interrupt of a pending input(): reply after {run.reply_at - sent:.3f} s")
    content = run.reply["content"]
    assert content["status"] == "error", run.describe()
    assert content["ename"] == "KeyboardInterrupt", run.describe()
    assert "not reached" not in run.stdout
    assert run.reply_at - sent < 5.0, run.describe()
    after = run_cell(kc, "print(survivor, 'answer' in globals())")
    assert after.status == "ok", after.describe()
    assert after.stdout == f"{mode} False\n", after.describe()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("call", "caller"), [("input('x? ')", "raw_input"), ("getpass.getpass()", "getpass")]
)
def test_input_without_stdin_fails_at_once(
    kc: BlockingKernelClient, call: str, caller: str
) -> None:
    run = run_cell(kc, f"value = {call}", timeout=30)  # run_cell sends allow_stdin=False

    elapsed = run.reply_at - run.sent_at
    content = run.reply["content"]
    assert content["status"] == "error", run.describe()
    assert content["ename"] == "StdinNotImplementedError", run.describe()
    assert content["evalue"] == STDIN_ERROR.format(caller)  # ipykernel's words
    assert elapsed < NO_STDIN_LIMIT, f"the reply took {elapsed:.2f} s"
    after = run_cell(kc, "print('next cell runs')")
    assert after.stdout == "next cell runs\n", after.describe()


@pytest.mark.timeout(240)
def test_nbclient_gets_an_error_for_input_not_a_hang(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        # The first cell waits for the sandbox; keep that out of the input cell's time.
        nbformat.v4.new_code_cell("import os"),
        nbformat.v4.new_code_cell("name = input('Your name: ')"),
        nbformat.v4.new_code_cell("print('after the input cell')"),
    ]
    env = env_for_kernel(request)

    # nbclient itself sets allow_stdin=False; allow_errors lets it go on to cell 2.
    executed = execute_notebook(nb, KERNEL_NAME, env, tmp_path, timeout=60)

    _, first, second = executed.cells
    assert [o["output_type"] for o in first.outputs] == ["error"], first.outputs
    assert first.outputs[0]["ename"] == "StdinNotImplementedError"
    assert first.outputs[0]["evalue"] == STDIN_ERROR.format("raw_input")
    timing = first.metadata["execution"]
    took = (
        datetime.fromisoformat(timing["shell.execute_reply"].replace("Z", "+00:00"))
        - datetime.fromisoformat(timing["iopub.execute_input"].replace("Z", "+00:00"))
    ).total_seconds()
    print(f"\nnbclient: input() failed {took:.3f} s after the cell started")
    assert took < NO_STDIN_LIMIT, f"input() under nbclient took {took:.2f} s to fail"
    assert [o.get("text") for o in second.outputs] == ["after the input cell\n"]


# --------------------------------------------------------------------------- options


@pytest.mark.timeout(60)
@pytest.mark.skipif(
    not is_modbox(),
    reason="ipykernel publishes print output of silent requests, though the messaging "
    "protocol says silent code broadcasts no output",
)
def test_silent_execution_runs_without_output(kc: BlockingKernelClient) -> None:
    msg_id = kc.execute("print('should not show'); silent_var = 41; 'nor this'", silent=True)
    reply = kc.get_shell_msg(timeout=30)
    assert reply["parent_header"]["msg_id"] == msg_id
    assert reply["content"]["status"] == "ok", reply["content"]
    published = []
    while True:
        msg = kc.get_iopub_msg(timeout=30)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
        if msg["msg_type"] != "status":
            published.append(msg["msg_type"])
    # Not even execute_input: a silent request is invisible to other frontends.
    assert published == []
    after = run_cell(kc, "print(silent_var + 1)")
    assert after.stdout == "42\n", "the silent code did not run"


def _history_sources(kc: BlockingKernelClient) -> list[str]:
    kc.history(hist_access_type="tail", n=20, raw=True, output=False)
    reply = kc.get_shell_msg(timeout=30)
    assert reply["msg_type"] == "history_reply", reply["msg_type"]
    return [entry[2] for entry in reply["content"]["history"]]


def _unstored(kc: BlockingKernelClient, code: str) -> None:
    msg_id = kc.execute(code, store_history=False)
    reply = kc.get_shell_msg(timeout=30)
    assert reply["parent_header"]["msg_id"] == msg_id
    assert reply["content"]["status"] == "ok", reply["content"]


@pytest.mark.timeout(60)
def test_store_history_false_does_not_advance_the_count(kc: BlockingKernelClient) -> None:
    first = run_cell(kc, "'counted'")
    assert first.status == "ok", first.describe()
    count = first.reply["content"]["execution_count"]

    _unstored(kc, "not_counted = 1")

    second = run_cell(kc, "'counted again'")
    assert second.status == "ok", second.describe()
    results = [m["content"]["execution_count"] for m in second.outputs]
    assert (second.reply["content"]["execution_count"], results) == (count + 1, [count + 1]), (
        "a store_history=False request advanced the execution count (IPython's does not)"
    )


@pytest.mark.timeout(60)
def test_store_history_false_is_not_in_history(kc: BlockingKernelClient) -> None:
    assert run_cell(kc, "stored_marker = 1").status == "ok"
    _unstored(kc, "unstored_marker = 1")
    assert run_cell(kc, "print(unstored_marker)").stdout == "1\n", "the unstored cell did not run"

    sources = _history_sources(kc)

    assert "stored_marker = 1" in sources, sources
    assert "unstored_marker = 1" not in sources, "a store_history=False cell is in history"


@pytest.mark.timeout(60)
def test_user_expressions_are_returned(kc: BlockingKernelClient) -> None:
    msg_id = kc.execute(
        "ux = 21",
        user_expressions={"double": "ux * 2", "text": "'a' + 'b'", "broken": "1 / 0"},
    )
    reply = kc.get_shell_msg(timeout=30)
    assert reply["parent_header"]["msg_id"] == msg_id
    content = reply["content"]
    assert content["status"] == "ok", content
    expressions = content["user_expressions"]
    assert expressions["double"]["status"] == "ok"
    assert expressions["double"]["data"]["text/plain"] == "42"
    assert expressions["text"]["data"]["text/plain"] == "'ab'"
    assert expressions["broken"]["status"] == "error"
    assert expressions["broken"]["ename"] == "ZeroDivisionError"
