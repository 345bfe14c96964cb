"""The notebook's folder in the sandbox: relative paths work as with a local kernel.

Jupyter starts a kernel in the notebook's folder, and notebooks read their inputs from
there (``pd.read_csv("data.csv")``). modbox-python copies that folder into each new
sandbox's working directory, leaving out hidden files, caches, virtual environments
and symlinks, and copies nothing (with one notice naming the setting) past
``MODBOX_COPY_LIMIT`` or when it is a home folder.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from kernel_helpers import (
    KERNEL_NAME,
    REFERENCE_KERNEL,
    env_for_kernel,
    execute_notebook,
    normalise_notebook,
    only_modbox,
    run_cell,
    start_kernel,
    stop_kernel,
)

from modbox_kernel.workdir import pack_folder

pytestmark = pytest.mark.kernel

READS = [
    "import pandas as pd\nframe = pd.read_csv('data.csv')\nint(frame['x'].sum())",
    "print(open('sub/inner.txt').read(), end='')",
    "with open('results.txt', 'w') as f:\n    f.write('made here')\n"
    "print(open('results.txt').read())",
]
# Each is printed as present or absent by the exclusion test.
PROBES = [
    "data.csv",
    "sub/inner.txt",
    ".secret",
    ".git/config",
    "__pycache__/cached.pyc",
    "venv/pyvenv.cfg",
    "link_to_data.csv",
    "linked_dir/inner.txt",
]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A notebook's folder: inputs, plus what must not be copied."""
    root = tmp_path / "project"
    (root / "sub").mkdir(parents=True)
    (root / "data.csv").write_text("x,y\n1,2\n3,4\n")
    (root / "sub" / "inner.txt").write_text("inner text\n")
    (root / ".secret").write_text("TOKEN=do-not-copy\n")
    (root / ".git").mkdir()
    (root / ".git" / "config").write_text("[core]\n")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "cached.pyc").write_bytes(b"\0")
    (root / "venv").mkdir()
    (root / "venv" / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (root / "link_to_data.csv").symlink_to(root / "data.csv")
    (root / "linked_dir").symlink_to(root / "sub")
    return root


def _notebook(cells: list[str]) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in cells]
    return nb


def test_a_notebook_reads_files_next_to_it_as_under_python3(
    request: pytest.FixtureRequest, folder: Path
) -> None:
    results = {}
    for name in (REFERENCE_KERNEL, KERNEL_NAME):
        env = env_for_kernel(request, name)
        executed = execute_notebook(_notebook(READS), name, env, cwd=folder)
        results[name] = normalise_notebook(executed)
        written = folder / "results.txt"
        # A local kernel writes next to the notebook; the sandbox keeps what it writes.
        assert written.exists() == (name == REFERENCE_KERNEL)
        written.unlink(missing_ok=True)
    assert results[KERNEL_NAME] == results[REFERENCE_KERNEL]
    outputs = [cell["outputs"] for cell in results[KERNEL_NAME]]
    assert outputs[0][0]["execute_result"]["text/plain"] == "4", outputs
    assert outputs[1] == [{"stream": {"stdout": "inner text\n"}}], outputs


@pytest.fixture
def kernel_in(request: pytest.FixtureRequest) -> Iterator[Any]:
    started: list[tuple[Any, Any]] = []

    def start(cwd: Path, **settings: str) -> Any:
        km, kc = start_kernel(KERNEL_NAME, {**env_for_kernel(request), **settings}, cwd=cwd)
        started.append((km, kc))
        return kc

    yield start
    for km, kc in started:
        stop_kernel(km, kc)


def _present(kc: Any) -> dict[str, bool]:
    run = run_cell(kc, f"import os\nfor p in {PROBES!r}:\n    print(p, os.path.exists(p))")
    assert run.status == "ok", run.describe()
    return {p: flag == "True" for p, flag in (line.split() for line in run.stdout.splitlines())}


@only_modbox("copying the folder is what modbox-python adds")
def test_hidden_files_caches_venvs_and_symlinks_stay_behind(kernel_in: Any, folder: Path) -> None:
    kc = kernel_in(folder)
    present = _present(kc)
    assert {p for p, there in present.items() if there} == {"data.csv", "sub/inner.txt"}, present


@only_modbox("copying the folder is what modbox-python adds")
def test_a_folder_over_the_limit_is_not_copied_and_the_cell_says_why(
    kernel_in: Any, folder: Path
) -> None:
    kc = kernel_in(folder, MODBOX_COPY_LIMIT="10")
    first = run_cell(kc, "print('first')")
    assert first.status == "ok", first.describe()
    assert first.stdout == "first\n"
    assert "MODBOX_COPY_LIMIT" in first.stderr and str(folder) in first.stderr, first.describe()
    assert not any(_present(kc).values())
    again = run_cell(kc, "print('again')")
    assert again.stderr == "", "the notice is shown once"


@only_modbox("copying the folder is what modbox-python adds")
def test_copying_can_be_turned_off(kernel_in: Any, folder: Path) -> None:
    kc = kernel_in(folder, MODBOX_COPY_WORKDIR="0")
    run = run_cell(kc, "print('ran')")
    assert (run.stdout, run.stderr) == ("ran\n", ""), run.describe()
    assert not any(_present(kc).values())


@only_modbox("copying the folder is what modbox-python adds")
def test_a_replacement_sandbox_gets_the_folder_again(
    request: pytest.FixtureRequest, kernel_in: Any, folder: Path
) -> None:
    service = request.getfixturevalue("local_service")
    kc = kernel_in(folder)
    first = run_cell(kc, "import os\nprint(os.environ['MODBOX_SANDBOX_ID'])")
    assert first.status == "ok", first.describe()
    with service.client() as control:
        assert control.delete(f"/sandboxes/{first.stdout.strip()}").status_code == 200
    lost = run_cell(kc, "print('in the lost sandbox')")
    assert lost.status == "error", lost.describe()  # the loss is reported in a cell
    again = run_cell(kc, "print(open('data.csv').read(), end='')")
    assert again.status == "ok", again.describe()
    assert again.stdout == "x,y\n1,2\n3,4\n"


def test_a_home_folder_is_never_packed(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(folder))
    packed = pack_folder(str(folder), limit=10**9)
    assert packed.archive is None and packed.skipped is not None
    assert "your home folder" in packed.skipped
    monkeypatch.setenv("HOME", os.path.dirname(folder))
    assert pack_folder(str(folder), limit=10**9).files == 2
