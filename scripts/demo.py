"""`make demo`: run notebooks/quickstart.ipynb through the Modbox Python kernel.

Uses the embedded local backend (no Modbox account needed): MODBOX_BACKEND is forced
to ``local`` for the kernel it starts. Writes the executed notebook to
notebooks/out/quickstart.ipynb and prints a short summary of what each cell produced.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "notebooks" / "quickstart.ipynb"
OUT = ROOT / "notebooks" / "out" / "quickstart.ipynb"


def summarize(output: dict) -> str:
    kind = output["output_type"]
    if kind == "stream":
        text = output["text"].strip().splitlines()
        return f"{output['name']}: {text[-1] if text else ''}"[:80]
    if kind == "error":
        return f"error: {output['ename']}: {output['evalue']}"[:80]
    mimes = ", ".join(sorted(output.get("data", {})))
    return f"{kind}: {mimes}"


def main() -> int:
    os.environ["MODBOX_BACKEND"] = "local"
    os.environ.pop("MODBOX_API_TOKEN", None)
    nb = nbformat.read(SOURCE, as_version=4)
    client = NotebookClient(
        nb,
        kernel_name="modbox-python",
        timeout=120,
        startup_timeout=120,
        resources={"metadata": {"path": str(SOURCE.parent)}},
    )
    t0 = time.monotonic()
    client.execute()
    elapsed = time.monotonic() - t0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, OUT)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        first = cell.source.strip().splitlines()[0] if cell.source.strip() else ""
        print(f"[{i}] {first[:60]}")
        for output in cell.get("outputs", []):
            print(f"      -> {summarize(output)}")
    print(f"\nExecuted {SOURCE.relative_to(ROOT)} on Modbox Python in {elapsed:.1f} s.")
    print(f"The executed notebook was written to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
