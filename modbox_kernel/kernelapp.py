"""The kernel application: ``python -m modbox_kernel -f {connection_file}``.

Jupyter starts this through the kernelspec's argv. It is ipykernel's ``IPKernelApp``
with our kernel class and two changed defaults:

* ``capture_fd_output`` is off: no user code runs in this process, and capturing fds 1
  and 2 would turn the embedded service's log lines into cell output.
* the config file is ``modbox_kernel_config.py`` (app name ``modbox-kernel``), so
  ``--ModboxKernel.<trait>=…`` on the command line and that file both configure it.

Once the kernel has shut down, :func:`main` ends the process through
:func:`exit_without_teardown` instead of returning to the interpreter's exit.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from typing import Any, NoReturn

from ipykernel.kernelapp import IPKernelApp
from traitlets import Bool, Type

from .kernel import ModboxKernel


class ModboxKernelApp(IPKernelApp):
    """IPKernelApp that runs :class:`ModboxKernel`."""

    name = "modbox-kernel"
    kernel_class = Type(ModboxKernel, klass="ipykernel.kernelbase.Kernel").tag(  # type: ignore[assignment]
        config=True
    )
    capture_fd_output = Bool(False).tag(config=True)

    @property
    def classes(self) -> list[Any]:  # type: ignore[override]
        return [*super().classes, ModboxKernel]


def main(argv: list[str] | None = None) -> NoReturn:
    """Launch the kernel; once it has shut down, end the process (never returns)."""
    try:
        ModboxKernelApp.launch_instance(argv=argv)
    except SystemExit as exc:
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    else:
        code = 0
    exit_without_teardown(code)


def exit_without_teardown(code: int) -> NoReturn:
    """End the process as the interpreter would, less the teardown of its objects.

    Why: once a kernel has shut down, the interpreter still spends 0.1-0.15 s of CPU
    freeing the ~36,000 objects that ipykernel, IPython and jupyter_client import
    (measured: importing ``ipykernel.kernelapp`` and exiting). jupyter_client checks
    every 0.1 s whether a kernel it asked to shut down has exited, so that time made
    every shutdown and restart one or two checks longer (python3's kernel pays it
    too). What the interpreter's exit does for the program happens here, in its
    order: wait for non-daemon threads, run the atexit hooks (ipykernel closes its
    sockets there; ``embedded`` stops an unused service), flush the standard streams.
    """
    # What the interpreter calls first: the hooks of ``threading._register_atexit``
    # (concurrent.futures stops its workers there, asyncio.to_thread's among them),
    # then a join of every non-daemon thread. Private, hence the fallback.
    shutdown = getattr(threading, "_shutdown", None)
    if callable(shutdown):
        shutdown()
    else:
        for thread in threading.enumerate():
            if thread is not threading.main_thread() and not thread.daemon:
                thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.flush()
    os._exit(code)
