"""The real command-line tools run notebooks on modbox-python.

Each test runs one tool as a subprocess, exactly as a user would type it, and then reads
the notebook the tool wrote:

* ``jupyter nbconvert --to notebook --execute`` on ``notebooks/quickstart.ipynb``, with
  no token in the environment, so the kernel starts its own embedded local service
  (the default path for a user who has configured nothing);
* ``jupyter execute`` on ``notebooks/batch.ipynb``;
* ``papermill -p n 5 …`` on ``notebooks/batch.ipynb`` (parameters injected and used);
* ``papermill`` on a notebook whose middle cell raises: non-zero exit, the cell marked
  failed, the later cell pending, papermill's "An Exception was encountered" banner.

All but the nbconvert test use the session's shared local service for speed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nbformat
import pytest
from kernel_helpers import (
    KERNEL_NAME,
    NOTEBOOKS,
    STARTUP_TIMEOUT,
    embedded_env,
    env_for_kernel,
    read_notebook,
)

pytestmark = pytest.mark.kernel

TOOL_TIMEOUT = 600


def _run(
    args: Sequence[str], env: Mapping[str, str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        env=dict(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT,
        check=False,
    )


def _papermill(
    args: Sequence[str], env: Mapping[str, str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    """``papermill -k <kernel under test> … <args>``, as a batch job would call it."""
    return _run(
        [
            "papermill",
            "-k",
            KERNEL_NAME,
            "--start-timeout",
            str(STARTUP_TIMEOUT),
            "--no-progress-bar",
            *args,
        ],
        env,
        cwd,
    )


def _nbconvert(
    notebook: Path, output: str, env: Mapping[str, str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    """``jupyter nbconvert --to notebook --execute`` on the kernel under test, into ``cwd``."""
    return _run(
        [
            "jupyter",
            "nbconvert",
            "--to",
            "notebook",
            "--execute",
            f"--ExecutePreprocessor.kernel_name={KERNEL_NAME}",
            f"--ExecutePreprocessor.startup_timeout={STARTUP_TIMEOUT}",
            "--ExecutePreprocessor.timeout=300",
            f"--output-dir={cwd}",
            f"--output={output}",
            str(notebook),
        ],
        env,
        cwd,
    )


def _explain(proc: subprocess.CompletedProcess[str]) -> str:
    return (
        f"exit {proc.returncode}\n"
        f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
    )


def _text(cell: Any) -> str:
    """All stream text and text/plain data of one cell."""
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif "data" in out:
            parts.append(str(out["data"].get("text/plain", "")))
    return "".join(parts)


def _mimes(cell: Any) -> set[str]:
    return {mime for out in cell.get("outputs", []) for mime in out.get("data", {})}


def _code_cells(nb: Any) -> list[Any]:
    return [c for c in nb.cells if c.cell_type == "code"]


def test_nbconvert_execute_quickstart_with_embedded_backend(tmp_path: Path) -> None:
    env = embedded_env()  # no MODBOX_API_TOKEN: the kernel starts its own service
    proc = _nbconvert(NOTEBOOKS / "quickstart.ipynb", "quickstart-executed", env, tmp_path)
    assert proc.returncode == 0, _explain(proc)

    nb = read_notebook(tmp_path / "quickstart-executed.ipynb")
    cells = _code_cells(nb)
    state, streamed, table, plot, failing = cells[1], cells[2], cells[3], cells[4], cells[5]
    assert _text(state) == "hello from the sandbox\nsum: 31 max: 9\n"
    assert _text(streamed) == "".join(f"step {i}/5\n" for i in range(1, 6)) + "done\n"
    assert "text/html" in _mimes(table) and "Lisbon" in table.outputs[0]["data"]["text/html"]
    assert "image/png" in _mimes(plot)
    errors = [o for o in failing.outputs if o["output_type"] == "error"]
    assert [(e["ename"], e["evalue"]) for e in errors] == [
        ("ZeroDivisionError", "division by zero")
    ]
    assert all(c.execution_count == i for i, c in enumerate(cells, start=1))


def test_jupyter_execute_batch(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    # `jupyter execute --output` writes next to its input, so run a copy.
    shutil.copy(NOTEBOOKS / "batch.ipynb", tmp_path / "batch.ipynb")
    proc = _run(
        [
            "jupyter",
            "execute",
            f"--kernel_name={KERNEL_NAME}",
            f"--startup_timeout={STARTUP_TIMEOUT}",
            "--output=batch-executed",
            str(tmp_path / "batch.ipynb"),
        ],
        env_for_kernel(request),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, _explain(proc)

    cells = _code_cells(read_notebook(tmp_path / "batch-executed.ipynb"))
    assert _text(cells[1]) == "demo: n=3 squares=[1, 4, 9]\n"
    assert _text(cells[2]) == "demo: total=14\n14"


def test_papermill_injects_parameters(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    out_path = tmp_path / "batch-out.ipynb"
    proc = _papermill(
        ["-p", "n", "5", "-p", "label", "nightly", str(NOTEBOOKS / "batch.ipynb"), str(out_path)],
        env_for_kernel(request),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, _explain(proc)

    nb = read_notebook(out_path)
    cells = _code_cells(nb)
    injected = [c for c in cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1
    assert "n = 5" in injected[0].source and 'label = "nightly"' in injected[0].source
    assert _text(cells[-2]) == "nightly: n=5 squares=[1, 4, 9, 16, 25]\n"
    assert _text(cells[-1]) == "nightly: total=55\n55"
    assert [c.metadata["papermill"]["status"] for c in cells] == ["completed"] * len(cells)
    assert nb.metadata["papermill"]["parameters"] == {"n": 5, "label": "nightly"}


def test_papermill_reports_a_failing_cell(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": KERNEL_NAME,
        "display_name": KERNEL_NAME,
        "language": "python",
    }
    nb.cells = [
        nbformat.v4.new_code_cell("print('before the failure')"),
        nbformat.v4.new_code_cell("raise RuntimeError('planned failure in a batch run')"),
        nbformat.v4.new_code_cell("print('never runs')"),
    ]
    in_path, out_path = tmp_path / "failing.ipynb", tmp_path / "failing-out.ipynb"
    nbformat.write(nb, in_path)

    proc = _papermill([str(in_path), str(out_path)], env_for_kernel(request), cwd=tmp_path)
    assert proc.returncode != 0, _explain(proc)
    assert "PapermillExecutionError" in proc.stderr, _explain(proc)
    assert "planned failure in a batch run" in proc.stderr, _explain(proc)

    out = read_notebook(out_path)
    cells = _code_cells(out)
    statuses = [c.metadata["papermill"]["status"] for c in cells]
    assert statuses == ["completed", "failed", "pending"]
    assert _text(cells[0]) == "before the failure\n"
    errors = [o for o in cells[1].outputs if o["output_type"] == "error"]
    assert [(e["ename"], e["evalue"]) for e in errors] == [
        ("RuntimeError", "planned failure in a batch run")
    ]
    assert cells[2].outputs == []
    banners = [
        c
        for c in out.cells
        if c.cell_type == "markdown" and "An Exception was encountered" in c.source
    ]
    assert len(banners) == 1


def _course_notebook(path: Path) -> None:
    """A notebook that starts as course notebooks do: the stock kernel's magics first."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": KERNEL_NAME, "display_name": KERNEL_NAME}
    nb.metadata["kernelspec"]["language"] = "python"
    nb.cells = [
        nbformat.v4.new_code_cell("%autosave 0"),
        nbformat.v4.new_code_cell("%matplotlib notebook\n%matplotlib inline"),
        nbformat.v4.new_code_cell("%connect_info"),
        nbformat.v4.new_code_cell("print('the lesson runs')"),
    ]
    nbformat.write(nb, path)


@pytest.mark.parametrize("tool", ["nbconvert", "papermill"])
def test_a_course_notebook_starting_with_autosave_runs_without_errors(
    tool: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Errors not allowed (both tools' default): a magic the kernel lacked aborted the run."""
    in_path, out_path = tmp_path / "lesson.ipynb", tmp_path / "lesson-out.ipynb"
    _course_notebook(in_path)
    if tool == "nbconvert":
        proc = _nbconvert(in_path, "lesson-out", env_for_kernel(request), tmp_path)
    else:
        proc = _papermill([str(in_path), str(out_path)], env_for_kernel(request), cwd=tmp_path)
    assert proc.returncode == 0, _explain(proc)
    cells = _code_cells(read_notebook(out_path))
    assert _text(cells[0]) == "Autosave disabled\n"
    assert "application/javascript" in _mimes(cells[0])
    assert not [o for c in cells for o in c.outputs if o["output_type"] == "error"]
    assert "jupyter <app> --existing" in _text(cells[2])
    assert _text(cells[3]) == "the lesson runs\n"
