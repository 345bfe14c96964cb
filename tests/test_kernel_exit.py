"""The kernel process ends without the interpreter's teardown, and loses nothing by it.

``modbox_kernel.kernelapp.exit_without_teardown`` ends the process with ``os._exit``
once the kernel has shut down (the teardown of ipykernel's objects costs 0.1-0.15 s,
and jupyter_client checks for the exit every 0.1 s). What the interpreter's own exit
does for a program must still happen, in its order; the first test checks each part
on a real process. The second shuts a real kernel down as jupyter_client does, beside
the stock python3 kernel: both processes must end by themselves with exit status 0
(no SIGTERM from jupyter_client). That nothing of an embedded service outlives its
kernel is ``tests/test_kernel_leaks.py``'s job.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from jupyter_client.manager import KernelManager
from kernel_helpers import (
    KERNEL_NAME,
    REFERENCE_KERNEL,
    env_for_kernel,
    run_cell,
    start_kernel,
)

PROGRAM = textwrap.dedent(
    """
    import atexit, concurrent.futures, sys, threading, time
    from pathlib import Path
    from modbox_kernel.kernelapp import exit_without_teardown

    out = Path(sys.argv[1])
    atexit.register(lambda: (out / "atexit").write_text("ran"))

    def late(name: str) -> None:
        time.sleep(0.3)
        (out / name).write_text("done")

    threading.Thread(target=late, args=("thread",)).start()  # not a daemon
    concurrent.futures.ThreadPoolExecutor(1).submit(late, "executor")
    sys.stdout.write("buffered, no newline")
    sys.stderr.write("stderr too")
    exit_without_teardown(3)
    (out / "after").write_text("exit_without_teardown returned")
    """
)


def test_exit_without_teardown_does_what_the_interpreters_exit_does(tmp_path: Path) -> None:
    script = tmp_path / "program.py"
    script.write_text(PROGRAM)
    # A pipe, not a terminal, and buffering left on: only a flush delivers stdout.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "buffered, no newline"
    assert proc.stderr == "stderr too"
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "thread").read_text() == "done"
    assert (tmp_path / "executor").read_text() == "done"
    assert not (tmp_path / "after").exists()


@pytest.mark.kernel
@pytest.mark.parametrize("kernel_name", [REFERENCE_KERNEL, KERNEL_NAME])
def test_a_shut_down_kernel_ends_by_itself_with_status_zero(
    request: pytest.FixtureRequest, kernel_name: str
) -> None:
    km: KernelManager
    km, kc = start_kernel(kernel_name, env_for_kernel(request, kernel_name))
    try:
        run = run_cell(kc, "print(6 * 7)")
        assert run.reply["content"]["status"] == "ok"
        assert run.stdout == "42\n"
        assert km.provisioner is not None
        process = km.provisioner.process  # type: ignore[attr-defined]
    finally:
        kc.stop_channels()
    km.shutdown_kernel(now=False)
    # jupyter_client SIGTERMs (-15) or SIGKILLs (-9) a kernel that does not end by itself.
    assert process.wait(timeout=10) == 0
