"""A malformed MODBOX_* setting, through a real kernel: the first cell says what to fix.

One kernel per kind of setting (a number, a boolean, a choice), started through
jupyter_client with the bad value in its environment. The kernel must come up, answer
every cell with one sentence naming the variable, what it got and what it accepts, and
start nothing (no embedded service, no sandbox) until it is restarted with a good value.
"""

from __future__ import annotations

import time

import psutil
import pytest
from kernel_helpers import KERNEL_NAME, embedded_env, run_cell, start_kernel, stop_kernel

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(120)]


@pytest.mark.parametrize(
    ("variable", "value", "accepts"),
    [
        ("MODBOX_TTL_SECONDS", "1h", "accepts a whole number of seconds"),
        ("MODBOX_COPY_WORKDIR", "sometimes", "accepts 1 or 0"),
        ("MODBOX_BACKEND", "cloud", "accepts one of auto, local, remote"),
    ],
    ids=["number", "boolean", "enum"],
)
def test_a_bad_setting_is_the_first_cells_error_and_the_kernel_lives(
    variable: str, value: str, accepts: str
) -> None:
    km, kc = start_kernel(KERNEL_NAME, {**embedded_env(), variable: value})
    try:
        for code in ("1 + 1", "print('again')"):
            run = run_cell(kc, code)
            assert run.status == "error", run.describe()
            content = run.reply["content"]
            assert content["ename"] == "ConfigurationError"
            sentence = content["evalue"]
            assert f"{variable}={value!r} is not a valid value" in sentence, sentence
            assert f"{variable} {accepts}" in sentence, sentence
            # The same error is the cell's output (what the notebook saves).
            errors = [m["content"] for m in run.outputs if m["msg_type"] == "error"]
            assert [e["evalue"] for e in errors] == [sentence]
        # The debugger gives the same sentence and starts nothing either.
        debug = kc.session.msg(
            "debug_request", {"type": "request", "seq": 1, "command": "initialize"}
        )
        kc.control_channel.send(debug)
        reply = kc.control_channel.get_msg(timeout=10)["content"]
        assert reply["success"] is False and variable in reply["message"], reply
        # Alive: it still answers, and it started no embedded service.
        kc.kernel_info()
        assert kc.get_shell_msg(timeout=10)["content"]["status"] == "ok"
        pid = km.provisioner.pid  # type: ignore[union-attr]
        time.sleep(0.5)
        children = psutil.Process(pid).children(recursive=True)
        assert not [p for p in children if "modbox_kernel.local" in " ".join(p.cmdline())]
    finally:
        stop_kernel(km, kc)
