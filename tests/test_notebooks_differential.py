"""Differential test: a notebook gives the same outputs on modbox-python as on python3.

Each notebook in ``notebooks/differential/`` runs through nbclient under the stock
``python3`` kernel (the reference) and under the kernel under test; the outputs are
normalised (``kernel_helpers.normalise_notebook``) and must be identical, cell by cell.
The notebooks cover pandas, matplotlib, display updates, clear_output, magics, shell
escapes, tracebacks, warnings, ``\\r`` progress, unicode and stderr; each names in its
metadata (``modbox_differential.expect``) what the reference run must contain, so a
broken reference cannot turn the comparison into one of two empty runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kernel_helpers import (
    KERNEL_NAME,
    NOTEBOOKS,
    REFERENCE_KERNEL,
    embedded_env,
    env_for_kernel,
    execute_notebook,
    normalise_notebook,
    output_kinds,
    read_notebook,
)

DIFFERENTIAL = sorted((NOTEBOOKS / "differential").glob("*.ipynb"))

pytestmark = pytest.mark.kernel


def test_differential_notebooks_exist() -> None:
    assert len(DIFFERENTIAL) >= 3, f"expected at least three notebooks in {NOTEBOOKS}"


@pytest.mark.parametrize("path", DIFFERENTIAL, ids=lambda p: p.stem)
def test_same_outputs_as_python3(
    path: Path, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    nb = read_notebook(path)
    ref_dir, test_dir = tmp_path / "reference", tmp_path / "under-test"
    ref_dir.mkdir()
    test_dir.mkdir()

    reference = normalise_notebook(
        execute_notebook(nb, REFERENCE_KERNEL, embedded_env(), cwd=ref_dir)
    )
    expected_kinds = set(nb.metadata["modbox_differential"]["expect"])
    missing = expected_kinds - output_kinds(reference)
    assert not missing, f"the python3 reference run lacks {missing}: fix the notebook"

    got = normalise_notebook(
        execute_notebook(nb, KERNEL_NAME, env_for_kernel(request), cwd=test_dir)
    )

    assert len(got) == len(reference)
    mismatches = [
        f"cell {i} ({want['cell']!r}):\n"
        f"  python3:    {json.dumps(want, ensure_ascii=False)[:1500]}\n"
        f"  {KERNEL_NAME}: {json.dumps(have, ensure_ascii=False)[:1500]}"
        for i, (want, have) in enumerate(zip(reference, got, strict=True))
        if want != have
    ]
    assert not mismatches, f"{len(mismatches)} cell(s) differ:\n" + "\n".join(mismatches)
