"""Interrupting a running cell (issue 4): both interrupt paths, escalation, state kept.

A frontend interrupts a kernel in one of two ways, and both must end the cell with a
``KeyboardInterrupt`` error reply quickly and leave the kernel (and the sandbox's
namespace) alive:

* **message**: ``km.interrupt_kernel()`` sends ``interrupt_request`` on the control
  channel, because the modbox-python kernelspec declares ``interrupt_mode: message``;
* **signal**: ``km.signal_kernel(SIGINT)`` is what Ctrl-C in ``jupyter console`` does.

A cell that swallows ``KeyboardInterrupt`` cannot be stopped politely; the kernel then
restarts the sandbox's Python process (after a grace period, or at once on a second
interrupt) and says that state was lost.

One kernel, started through jupyter_client against the shared local service, serves
the module. Every interrupt is sent only after the cell has printed a marker, so the
code is really running in the sandbox when the interrupt arrives; latencies are
measured from the interrupt call to the arrival of the execute_reply and printed
(``pytest -s``) next to the assertions.
"""

from __future__ import annotations

import signal
import time

import pytest
from kernel_helpers import (
    KERNEL_NAME,
    CellRun,
    Kernel,
    Kernels,
    env_for_kernel,
    is_modbox,
    only_modbox,
    pump,
    run_cell,
    start_cell,
)

pytestmark = pytest.mark.kernel

# Issue 4: a plain interrupt ends the cell within this time...
INTERRUPT_LIMIT = 1.0
# ...a cell that ignores it is ended by escalation within this time...
ESCALATION_LIMIT = 10.0
# ...and a second interrupt escalates at once: well before the kernel's own grace
# period (3 s) would have run out.
SECOND_INTERRUPT_LIMIT = 2.5
STARTED = "cell-started"

# Each cell imports what it needs: an escalation restarts the sandbox's Python.
SLEEP_CELL = f"import time\nprint({STARTED!r}, flush=True)\ntime.sleep(60)"
BUSY_CELL = f"print({STARTED!r}, flush=True)\nwhile True:\n    pass"
SWALLOW_CELL = (
    "import time\n"
    f"print({STARTED!r}, flush=True)\n"
    "while True:\n"
    "    try:\n"
    "        time.sleep(1)\n"
    "    except KeyboardInterrupt:\n"
    "        pass\n"
)

escalation = only_modbox("escalation restarts the sandbox's Python, which only modbox kernels have")


@pytest.fixture(scope="module")
def kernel(request: pytest.FixtureRequest, kernels: Kernels) -> Kernel:
    return kernels.start(env_for_kernel(request))


def interrupt(kernel: Kernel, mode: str) -> float:
    """Interrupt the way a ``mode`` frontend does; returns when it was sent."""
    sent = time.monotonic()
    if mode == "message":
        kernel.km.interrupt_kernel()
    else:
        kernel.km.signal_kernel(signal.SIGINT)
    return sent


def finish(kernel: Kernel, run: CellRun, sent: float, timeout: float) -> float:
    """Wait for the interrupted cell's reply, an error; the seconds since ``sent``."""
    done = pump(kernel.kc, run, lambda: run.done, timeout)
    assert done, f"no execute_reply within {timeout} s of the interrupt:\n{run.describe()}"
    assert run.reply["content"]["status"] == "error", run.describe()
    return run.reply_at - sent


def errors(run: CellRun) -> list[dict[str, str]]:
    return [m["content"] for m in run.outputs if m["msg_type"] == "error"]


def test_the_kernelspec_asks_for_message_interrupts(kernel: Kernel) -> None:
    # The "message" parametrisations below only mean what they say if the manager
    # really sends interrupt_request rather than SIGINT.
    if not is_modbox():
        pytest.skip(f"MODBOX_TEST_KERNEL={KERNEL_NAME} has its own kernelspec")
    assert kernel.km.kernel_spec is not None
    assert kernel.km.kernel_spec.interrupt_mode == "message"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["message", "signal"])
@pytest.mark.parametrize("code", [SLEEP_CELL, BUSY_CELL], ids=["sleep", "busy-loop"])
def test_interrupt_ends_the_cell_and_keeps_state(kernel: Kernel, mode: str, code: str) -> None:
    kept = run_cell(kernel.kc, f"kept = {mode!r} * 2")
    assert kept.status == "ok", kept.describe()
    run = start_cell(kernel.kc, code, STARTED)
    time.sleep(0.3)  # let the cell settle into its sleep / loop

    latency = finish(kernel, run, interrupt(kernel, mode), timeout=30)

    print(f"\n{mode} interrupt of {code.splitlines()[-1].strip()!r}: reply after {latency:.3f} s")
    content = run.reply["content"]
    assert content["ename"] == "KeyboardInterrupt", run.describe()
    assert [e["ename"] for e in errors(run)] == ["KeyboardInterrupt"], run.describe()
    assert latency < INTERRUPT_LIMIT, f"interrupt took {latency:.2f} s:\n{run.describe()}"

    after = run_cell(kernel.kc, "print(kept)")
    assert after.status == "ok", after.describe()
    assert after.stdout == f"{mode * 2}\n", "the namespace did not survive the interrupt"


@escalation
@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["message", "signal"])
def test_a_cell_that_swallows_the_interrupt_is_ended_by_escalation(
    kernel: Kernel, mode: str
) -> None:
    before = run_cell(kernel.kc, "doomed = 1")
    assert before.status == "ok", before.describe()
    run = start_cell(kernel.kc, SWALLOW_CELL, STARTED)

    latency = finish(kernel, run, interrupt(kernel, mode), timeout=60)

    print(f"\n{mode} interrupt of a cell that swallows it: ended after {latency:.2f} s")
    content = run.reply["content"]
    assert "lost" in content["evalue"], f"the error does not say state was lost: {content}"
    shown = errors(run)
    assert len(shown) == 1 and "lost" in shown[0]["evalue"], run.describe()
    assert latency < ESCALATION_LIMIT, f"escalation took {latency:.2f} s"

    after = run_cell(kernel.kc, "1+1")
    assert after.status == "ok", after.describe()
    results = [m["content"]["data"]["text/plain"] for m in after.outputs]
    assert results == ["2"], after.describe()
    # The sandbox's Python really was restarted: what the error said was lost is gone.
    gone = run_cell(kernel.kc, "print('doomed' in globals())")
    assert gone.stdout == "False\n", gone.describe()


@escalation
@pytest.mark.timeout(120)
def test_a_second_interrupt_escalates_at_once(kernel: Kernel) -> None:
    run = start_cell(kernel.kc, SWALLOW_CELL, STARTED)

    interrupt(kernel, "message")
    time.sleep(0.3)
    latency = finish(kernel, run, interrupt(kernel, "message"), timeout=60)

    print(f"\nsecond interrupt: cell ended {latency:.2f} s after it")
    assert "lost" in run.reply["content"]["evalue"], run.describe()
    assert latency < SECOND_INTERRUPT_LIMIT, (
        f"the cell ended {latency:.2f} s after the second interrupt: that is the grace "
        "period of the first, not an immediate escalation"
    )
    after = run_cell(kernel.kc, "print(6 * 7)")
    assert after.stdout == "42\n", after.describe()


@pytest.mark.timeout(60)
def test_an_interrupt_between_cells_is_harmless(kernel: Kernel) -> None:
    # jupyter_client's shutdown (and impatient users) interrupt idle kernels.
    assert run_cell(kernel.kc, "calm = 'still here'").status == "ok"
    interrupt(kernel, "message")
    interrupt(kernel, "signal")
    time.sleep(0.5)
    assert kernel.km.is_alive()
    after = run_cell(kernel.kc, "print(calm)")
    assert after.status == "ok", after.describe()
    assert after.stdout == "still here\n"
