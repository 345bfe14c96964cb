"""A notebook through nbclient, modbox-python beside the stock python3 kernel, interleaved.

Run: ``.venv/bin/python bench/bench_notebook.py [--rounds 10] [notebook.ipynb]``.

By default the notebook is ``notebooks/output_widget.ipynb``: ipywidgets' Output-widget
documentation pattern, whose cells nbclient answers widget messages for on the shell
socket while it waits for each reply (the case where a kernel's message timing can
stall nbclient). Each round runs it once under each kernel (the order alternating),
as ``jupyter execute`` would: a ``NotebookClient`` with a per-cell timeout of 10 s that
starts the kernel, runs every cell and shuts the kernel down. Printed, as medians over
the rounds, with the ratio modbox/python3:

* the whole run (``NotebookClient.execute()``: kernel start, every cell, shutdown);
* the cells after the first (the first cell of modbox-python also waits for its
  sandbox, which the whole run counts);
* the slowest single cell after the first (a stall shows here as seconds).

modbox-python runs on the embedded local backend, as ``make demo`` does.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient

KERNELS = ("python3", "modbox-python")
DEFAULT_NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "output_widget.ipynb"


def run_once(nb: Any, kernel: str, folder: str) -> dict[str, float]:
    """Execute ``nb`` under ``kernel``; the seconds of the whole run and of its cells."""
    cells: list[float] = []
    started = [0.0]

    def on_start(cell: Any, cell_index: int) -> None:
        started[0] = time.perf_counter()

    def on_done(cell: Any, cell_index: int, **_: Any) -> None:
        cells.append(time.perf_counter() - started[0])

    client = NotebookClient(
        nbformat.from_dict(nb),
        kernel_name=kernel,
        timeout=10,
        allow_errors=True,
        resources={"metadata": {"path": folder}},
        on_cell_start=on_start,
        on_cell_executed=on_done,
    )
    t0 = time.perf_counter()
    client.execute()
    whole = time.perf_counter() - t0
    if len(cells) != len(nb.cells):
        raise RuntimeError(f"{kernel}: {len(cells)} of {len(nb.cells)} cells ran")
    return {"whole": whole, "later": sum(cells[1:]), "slowest": max(cells[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook", nargs="?", default=str(DEFAULT_NOTEBOOK))
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    nb = nbformat.read(args.notebook, as_version=4)
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in KERNELS}
    with tempfile.TemporaryDirectory(prefix="bench-notebook-") as folder:
        for kernel in KERNELS:  # warm-up: imports and caches, not measured
            run_once(nb, kernel, folder)
        for i in range(args.rounds):
            order = KERNELS if i % 2 == 0 else KERNELS[::-1]
            for kernel in order:
                runs[kernel].append(run_once(nb, kernel, folder))
    print(f"\n{Path(args.notebook).name}: {len(nb.cells)} cells, {args.rounds} rounds, medians")
    print(f"{'':32} {'python3':>10} {'modbox':>10} {'ratio':>7}")
    for key, label in [
        ("whole", "whole run (start, cells, shutdown)"),
        ("later", "cells after the first"),
        ("slowest", "slowest cell after the first"),
    ]:
        ours = statistics.median(r[key] for r in runs["modbox-python"])
        theirs = statistics.median(r[key] for r in runs["python3"])
        print(f"{label:32} {theirs * 1000:8.0f}ms {ours * 1000:8.0f}ms {ours / theirs:6.2f}x")


if __name__ == "__main__":
    main()
