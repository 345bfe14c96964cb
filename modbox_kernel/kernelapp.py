"""The kernel application: ``python -m modbox_kernel -f {connection_file}``.

Jupyter starts this through the kernelspec's argv. It is ipykernel's ``IPKernelApp``
with our kernel class and two changed defaults:

* ``capture_fd_output`` is off: no user code runs in this process, and capturing fds 1
  and 2 would turn the embedded service's log lines into cell output.
* the config file is ``modbox_kernel_config.py`` (app name ``modbox-kernel``), so
  ``--ModboxKernel.<trait>=…`` on the command line and that file both configure it.
"""

from __future__ import annotations

from typing import Any

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


def main(argv: list[str] | None = None) -> None:
    """Launch the kernel (blocks until it shuts down)."""
    ModboxKernelApp.launch_instance(argv=argv)
