"""Cell file names exactly as ipykernel makes them (its ``compiler.py``).

Warnings (``/tmp/ipykernel_<pid>/<hash>.py:2: UserWarning``), SyntaxError messages and
traceback rendering depend on the file name a cell's code object gets, so using
ipykernel's scheme makes them read exactly as they do on the local ``python3`` kernel.
The IPython runner's compiler calls :func:`cell_file_name` for every cell.
"""

from __future__ import annotations

import os
import tempfile


def murmur2_x86(data: bytes, seed: int) -> int:
    """ipykernel's cell-name hash (``ipykernel/compiler.py``), ported byte for byte."""
    m = 0x5BD1E995
    length = len(data)
    h = seed ^ length
    rounded_end = length & 0xFFFFFFFC
    for i in range(0, rounded_end, 4):
        k = data[i] | (data[i + 1] << 8) | (data[i + 2] << 16) | (data[i + 3] << 24)
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> 24
        k = (k * m) & 0xFFFFFFFF
        h = (h * m) & 0xFFFFFFFF
        h ^= k
    tail = length & 0x03
    k = 0
    if tail == 3:
        k = data[rounded_end + 2] << 16
    if tail in (2, 3):
        k |= data[rounded_end + 1] << 8
    if tail:
        k |= data[rounded_end]
        h ^= k
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h


#: The hash's seed (the debugger's ``debugInfo`` tells frontends, which hash cells too).
HASH_SEED = 0xC70F6907


def cell_folder() -> str:
    """The folder of the cells' file names (the debugger writes dumped cells there)."""
    return os.path.join(tempfile.gettempdir(), f"ipykernel_{os.getpid()}")


def cell_file_name(code: str) -> str:
    """The file name the stock kernel gives a cell's code object."""
    name = murmur2_x86(code.encode("utf-8"), HASH_SEED)
    return os.path.join(cell_folder(), f"{name}.py")
