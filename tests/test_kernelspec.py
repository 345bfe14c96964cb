"""The kernelspec: shipped in the wheel as shared-data, and `python -m modbox_kernel install`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from jupyter_client.kernelspec import KernelSpecManager

ROOT = Path(__file__).resolve().parent.parent


def test_installed_spec_is_visible_with_the_right_fields() -> None:
    spec = KernelSpecManager().get_kernel_spec("modbox-python")
    assert spec.display_name == "Modbox Python"
    assert spec.language == "python"
    assert spec.interrupt_mode == "message"
    assert spec.argv[1:] == ["-m", "modbox_kernel", "-f", "{connection_file}"]
    resources = {p.name for p in Path(spec.resource_dir).iterdir()}
    assert {"logo-32x32.png", "logo-64x64.png", "logo-svg.svg"} <= resources


def test_install_command_writes_a_pinned_spec(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "modbox_kernel", "install", "--prefix", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    spec_dir = tmp_path / "share" / "jupyter" / "kernels" / "modbox-python"
    assert str(spec_dir) in out.stdout
    spec = json.loads((spec_dir / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable  # pinned to the installing interpreter
    assert spec["interrupt_mode"] == "message"
    assert (spec_dir / "logo-64x64.png").is_file()


@pytest.mark.timeout(180)
def test_wheel_ships_the_kernelspec_as_shared_data(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        check=True,
        timeout=170,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("modbox_kernel-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    data = "modbox_kernel-0.1.0.data/data/share/jupyter/kernels/modbox-python/"
    assert data + "kernel.json" in names
    assert data + "logo-32x32.png" in names
    assert "modbox_kernel/agent/inside/daemon.py" in names  # the agent, built at run time
    assert "modbox_kernel/py.typed" in names
    # Installed from the wheel into a fresh venv (no dependencies: only the files matter;
    # pip --prefix would uninstall this venv's own copy first), the spec lands where
    # Jupyter looks in that environment, and `jupyter kernelspec list` shows it there.
    prefix = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(prefix)], check=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(prefix / "bin" / "python"), "install",
         "--no-deps", "-q", str(wheel)],
        check=True,
        timeout=120,
    )  # fmt: skip
    listed = subprocess.run(
        [sys.executable, "-m", "jupyter", "kernelspec", "list", "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env={**os.environ, "JUPYTER_PATH": str(prefix / "share" / "jupyter")},
    )
    specs = json.loads(listed.stdout)["kernelspecs"]
    installed = prefix / "share" / "jupyter" / "kernels" / "modbox-python"
    assert Path(specs["modbox-python"]["resource_dir"]) == installed
    assert json.loads((installed / "kernel.json").read_text())["display_name"] == "Modbox Python"
