"""The magics a Jupyter kernel adds to IPython's, and its ``%gui`` rules, in the sandbox.

``ipython_runner`` registers :func:`kernel_magics` on its shell at start and calls
:func:`check_gui` from the shell's ``enable_gui``. The stock kernel (ipykernel) defines
``%autosave``, ``%clear``, ``%less``/``%more``, ``%man``, ``%edit``, ``%connect_info``
and ``%qtconsole``; notebooks use them (``%autosave 0`` heads many course notebooks,
and a batch run that errors on it loses the whole run), so they behave here as there:
the same output, the same messages and payloads. Written from their documented
behaviour, not copied. Where the sandbox cannot do what the stock kernel does
(connection files and Qt live on the host), the magic says so in one sentence and
succeeds, as the stock kernel's own warnings do.
"""

from __future__ import annotations

import os
from typing import Any, Optional

#: ``%gui`` / ``%matplotlib`` names the stock kernel accepts (its event-loop table),
#: in its order: the same list appears in the same error message.
KNOWN_GUIS = (
    "inline",
    "nbagg",
    "webagg",
    "notebook",
    "ipympl",
    "widget",
    None,
    "qt",
    "qt5",
    "qt6",
    "wx",
    "tk",
    "gtk",
    "gtk3",
    "osx",
    "macosx",
    "asyncio",
)
#: Backends that draw through the frontend (comms, output): nothing runs beside the
#: cells, so they work in a sandbox exactly as in a local kernel.
FRONTEND_GUIS = ("inline", "nbagg", "webagg", "notebook", "ipympl", "widget", None)


def check_gui(gui: Optional[str]) -> None:
    """Raise UsageError (IPython's) for a GUI the sandbox cannot run; else return.

    Unknown names get the stock kernel's message. Desktop toolkits (Qt, Tk, GTK, wx,
    macOS) need a display the sandbox does not have: one sentence instead of a
    toolkit's import error. ``asyncio`` is accepted: cells already run inside the
    agent's asyncio loop, as ``%gui asyncio`` gives under the stock kernel.
    """
    from IPython.core.error import UsageError

    if gui not in KNOWN_GUIS:
        keys = {name: None for name in KNOWN_GUIS}.keys()
        raise UsageError(f"Invalid GUI request {gui!r}, valid ones are:{keys}")
    if gui in FRONTEND_GUIS or gui == "asyncio":
        return
    raise UsageError(
        f"GUI event loops ({gui}) cannot run inside the sandbox: it has no display; "
        "use a backend drawn by the notebook (%matplotlib inline, or widget with ipympl)."
    )


def kernel_magics(shell: Any) -> Any:
    """The ``Magics`` instance to register on ``shell`` (IPython imported lazily)."""
    from IPython.core import page
    from IPython.core.error import UsageError
    from IPython.core.magic import Magics, line_magic, magics_class
    from IPython.core.magics.code import CodeMagics, MacroToEdit
    from IPython.display import Javascript, display
    from IPython.utils import openpy

    def page_file(shell: Any, arg_s: str) -> None:
        if not arg_s:
            raise UsageError("Missing filename.")
        if arg_s.endswith(".py"):
            text = shell.pycolorize(openpy.read_py_file(arg_s, skip_encoding_cookie=False))
        else:
            with open(arg_s) as f:
                text = f.read()
        page.page(text)

    @magics_class
    class SandboxKernelMagics(Magics):
        @line_magic
        def autosave(self, arg_s: str) -> None:
            """Set the notebook's autosave interval in seconds (0 disables it).

            Only notebook frontends that run the message's JavaScript act on it.
            """
            try:
                interval = int(arg_s)
            except ValueError as exc:
                raise UsageError(f"%autosave requires an integer, got {arg_s!r}") from exc
            display(
                Javascript(f"IPython.notebook.set_autosave_interval({1000 * interval})"),
                include=["application/javascript"],
            )
            print(f"Autosaving every {interval} seconds" if interval else "Autosave disabled")

        @line_magic
        def clear(self, arg_s: str) -> None:
            """Clear the terminal (runs ``clear`` in the sandbox)."""
            self.shell.system("clear")  # type: ignore[union-attr]

        @line_magic
        def less(self, arg_s: str) -> None:
            """Show a file through the pager; ``.py`` files are syntax-highlighted."""
            page_file(self.shell, arg_s)

        @line_magic
        def more(self, arg_s: str) -> None:
            """Show a file through the pager (the same as ``%less``)."""
            page_file(self.shell, arg_s)

        @line_magic
        def man(self, arg_s: str) -> None:
            """Show the man page of a command through the pager."""
            page.page(
                self.shell.getoutput(f"man {arg_s} | col -b", split=False)  # type: ignore[union-attr]
            )

        @line_magic
        def edit(self, parameter_s: str = "", last_call: Any = None) -> None:
            """Ask the frontend to open a file (or an object's source) for editing."""
            last_call = last_call or ["", ""]
            opts, args = self.parse_options(parameter_s, "prn:")
            try:
                filename, lineno, _ = CodeMagics._find_edit_target(
                    self.shell, args, opts, last_call
                )
            except MacroToEdit:
                print("Macro editing not yet implemented in 2-process model.")
                return
            payload = {
                "source": "edit_magic",
                "filename": os.path.realpath(filename),
                "line_number": lineno,
            }
            self.shell.payload_manager.write_payload(payload)  # type: ignore[union-attr]

        @line_magic
        def connect_info(self, arg_s: str) -> None:
            """Where to find this kernel's connection file (it stays on the host)."""
            print(
                "This kernel's connection file is on the host, outside the sandbox (it "
                "holds the key that signs messages, which the sandbox never sees).\n"
                "To connect another client, on the host run:\n"
                "    $> jupyter kernel list        # or: jupyter --runtime-dir\n"
                "    $> jupyter <app> --existing <file>"
            )

        @line_magic
        def qtconsole(self, arg_s: str) -> None:
            """Open a Qt console on this kernel: on the host, where the display is."""
            import warnings

            warnings.warn(
                "Could not start qtconsole: the sandbox has no display; on the host, run "
                "`jupyter qtconsole --existing <connection file>`",
                stacklevel=2,
            )

        @line_magic
        def modbox(self, arg_s: str) -> None:
            """Modbox Python's own commands (status, pull, push), run by the kernel.

            The kernel handles a cell made only of ``%modbox`` lines before the sandbox
            sees it; this one only meets them mixed with code.
            """
            raise UsageError(
                "%modbox is handled by the kernel, not in the sandbox: put %modbox lines "
                "in a cell of their own (run %modbox? there for its help)"
            )

    return SandboxKernelMagics(shell=shell)
