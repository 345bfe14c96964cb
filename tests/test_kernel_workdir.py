"""The notebook's folder in the sandbox: relative paths work as with a local kernel.

Jupyter starts a kernel in the notebook's folder, and notebooks read their inputs from
there (``pd.read_csv("data.csv")``). modbox-python copies that folder into each new
sandbox's working directory, leaving out hidden files, caches, virtual environments
and symlinks, and copies nothing (with one notice naming the setting) past
``MODBOX_COPY_LIMIT`` or for ``/``. A home folder (a hub student's) is copied like any
other. What cells write there comes back (``tests/test_kernel_filesync.py``).
"""

from __future__ import annotations

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
        # A local kernel writes next to the notebook; the sandbox's file comes back there.
        assert written.read_text() == "made here", name
        written.unlink()
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


def test_a_home_folder_is_packed_like_any_other_but_root_never(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On a hub the server's root is the student's home: it is copied, with the same
    # exclusions (hidden files, caches, venvs, symlinks) as any folder.
    monkeypatch.setenv("HOME", str(folder))
    packed = pack_folder(str(folder), limit=10**9)
    assert packed.skipped is None and packed.files == 2
    root = pack_folder("/", limit=10**9)
    assert root.archive is None and root.skipped is not None
    assert "the root folder" in root.skipped


@pytest.fixture
def student_home(tmp_path: Path) -> Path:
    """A hub student's home: course files beside what must never reach a sandbox."""
    home = tmp_path / "home" / "student"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    (home / ".bash_history").write_text("export SECRET=1\n")
    (home / ".jupyter").mkdir()
    (home / ".jupyter" / "jupyter_server_config.json").write_text("{}")
    (home / "data.csv").write_text("x,y\n1,2\n3,4\n")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import pandas as pd\npd.read_csv('data.csv')")]
    nbformat.write(nb, str(home / "lesson.ipynb"))
    return home


def test_a_notebook_in_the_students_home_reads_its_data_as_under_python3(
    request: pytest.FixtureRequest, student_home: Path
) -> None:
    seen = {}
    for name in (REFERENCE_KERNEL, KERNEL_NAME):
        env = {**env_for_kernel(request, name), "HOME": str(student_home)}
        km, kc = start_kernel(name, env, cwd=student_home)
        try:
            run = run_cell(kc, "import pandas as pd\npd.read_csv('data.csv')")
            assert run.status == "ok", run.describe()
            results = [
                m["content"]["data"] for m in run.outputs if m["msg_type"] == "execute_result"
            ]
            seen[name] = (results, run.stderr)
        finally:
            stop_kernel(km, kc)
    assert seen[KERNEL_NAME] == seen[REFERENCE_KERNEL]
    (results, notice) = seen[KERNEL_NAME]
    assert "text/html" in results[0] and notice == ""  # no notice at all


@only_modbox("copying the folder is what modbox-python adds")
def test_a_students_keys_history_and_jupyter_files_stay_out(
    kernel_in: Any, student_home: Path
) -> None:
    kc = kernel_in(student_home, HOME=str(student_home))
    probes = [".ssh/id_rsa", ".ssh", ".bash_history", ".jupyter", "data.csv", "lesson.ipynb"]
    run = run_cell(kc, f"import os\nfor p in {probes!r}:\n    print(p, os.path.exists(p))")
    assert run.status == "ok", run.describe()
    present = {p: flag == "True" for p, flag in (line.split() for line in run.stdout.splitlines())}
    assert present == {
        ".ssh/id_rsa": False,
        ".ssh": False,
        ".bash_history": False,
        ".jupyter": False,
        "data.csv": True,
        "lesson.ipynb": True,
    }


@only_modbox("copying the folder is what modbox-python adds")
def test_a_home_over_the_limit_gives_one_notice_naming_the_setting(
    kernel_in: Any, student_home: Path
) -> None:
    kc = kernel_in(student_home, HOME=str(student_home), MODBOX_COPY_LIMIT="10")
    first = run_cell(kc, "print('first')")
    assert first.status == "ok", first.describe()
    (notice,) = [line for line in first.stderr.splitlines() if line]
    assert "MODBOX_COPY_LIMIT" in notice and str(student_home) in notice
    assert "spawner" in notice  # where a hub's operator sets it
    assert run_cell(kc, "print('again')").stderr == ""
