"""Install the ``modbox-python`` kernelspec: ``python -m modbox_kernel install``.

``pip install`` already ships the spec (``kernelspec/modbox-python`` in the repository)
as wheel shared-data (``share/jupyter/kernels/modbox-python``), so this command is for
the other cases:
a ``--user`` or ``--prefix`` install, or a spec pinned to this exact interpreter
(``argv[0]`` becomes ``sys.executable`` so the kernel runs where modbox_kernel is
installed, whichever Jupyter launches it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
from pathlib import Path

from jupyter_client.kernelspec import KernelSpecManager

KERNEL_NAME = "modbox-python"
SPEC_DIR = Path(__file__).resolve().parent.parent / "kernelspec" / KERNEL_NAME


def _spec_source() -> Path:
    """The committed spec dir (editable/source install) or the installed shared-data copy."""
    if SPEC_DIR.is_dir():
        return SPEC_DIR
    installed = Path(sys.prefix) / "share" / "jupyter" / "kernels" / KERNEL_NAME
    return installed


def install(*, user: bool = False, prefix: str | None = None, name: str = KERNEL_NAME) -> str:
    """Write kernel.json (argv pinned to this interpreter) plus logos; return the path."""
    source = _spec_source()
    with tempfile.TemporaryDirectory() as td:
        spec = json.loads((source / "kernel.json").read_text())
        spec["argv"] = [sys.executable, "-m", "modbox_kernel", "-f", "{connection_file}"]
        # JupyterLab enables its debugger from this flag. The embedded backend's sandboxes
        # run this interpreter, so it holds when debugpy is importable here.
        if importlib.util.find_spec("debugpy") is None:
            spec.get("metadata", {}).pop("debugger", None)
        (Path(td) / "kernel.json").write_text(json.dumps(spec, indent=2) + "\n")
        for logo in source.glob("logo-*"):
            shutil.copy(logo, td)
        return KernelSpecManager().install_kernel_spec(
            td, kernel_name=name, user=user, prefix=prefix, replace=True
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m modbox_kernel install",
        description="Install the 'Modbox Python' kernelspec.",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="install for the current user")
    where.add_argument(
        "--sys-prefix", action="store_true", help=f"install into sys.prefix ({sys.prefix})"
    )
    where.add_argument("--prefix", help="install into this prefix (e.g. a venv)")
    parser.add_argument("--name", default=KERNEL_NAME, help="kernelspec name")
    args = parser.parse_args(argv)
    prefix = sys.prefix if args.sys_prefix else args.prefix
    path = install(user=args.user, prefix=prefix, name=args.name)
    print(f"Installed kernelspec {args.name} in {path}")
    return 0
