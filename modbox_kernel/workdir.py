"""The notebook's folder, packed for the sandbox.

Who calls what, and when: Jupyter starts a kernel in the notebook's folder (JupyterLab,
nbclient, papermill and nbconvert all do), and a local kernel's cells read files there
(``pd.read_csv("data.csv")``). :meth:`modbox_kernel.session.SandboxSession._provision`
calls :func:`pack_folder` on that folder once per new sandbox, in a worker thread,
uploads the archive and unpacks it in the sandbox's working directory, so the same
relative paths work there. Nothing is copied back.

What is packed: regular files below the folder, except hidden ones (``.git``, ``.env``,
``.ssh``, ``.bash_history``, ``.jupyter``, ``.ipynb_checkpoints``), ``__pycache__``,
``node_modules`` and virtual environments; symlinks are not followed. A home folder is
packed like any other: on a hub (TLJH, Zero to JupyterHub, nbgrader courses) the
notebook server's root *is* the student's home, with the course's notebooks and data
in it, and what must stay private there (keys, shell history, tokens) is hidden and so
left out anyway. ``/`` is never packed. Past ``limit`` bytes or :data:`MAX_FILES` files
nothing is packed, and the reason says which setting to change and where: half a copy
would fail later and more confusingly.
"""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

MAX_FILES = 2000
# Entries looked at (files and folders, hidden ones included) before giving up: keeps
# the walk of a huge tree bounded even when most of it would be skipped.
MAX_ENTRIES = 20_000
SKIPPED_DIRS = frozenset({"__pycache__", "node_modules"})
MIB = 1024 * 1024


@dataclass
class Packed:
    """The outcome: an archive to copy, or the sentence saying why there is none."""

    archive: bytes | None = None  # gzip'd tar; None when there is nothing to copy
    files: int = 0
    size: int = 0  # bytes of file content
    skipped: str | None = None  # why nothing was copied although files exist


def pack_folder(root: str, limit: int) -> Packed:
    """Pack the copyable files below ``root`` (see the module docstring); blocking."""
    folder = Path(root).resolve()
    if folder == Path(folder.anchor):
        return Packed(
            skipped=f"{folder} is the root folder, so it was not copied into the sandbox;"
            " start the kernel in the notebook's own folder to have its files there"
        )
    found: list[tuple[str, str]] = []  # (path on this machine, name in the archive)
    size = entries = 0
    pending = [(str(folder), "")]
    while pending:
        directory, prefix = pending.pop()
        try:
            with os.scandir(directory) as listing:
                children = sorted(listing, key=lambda entry: entry.name)
        except OSError:
            continue  # unreadable: a local kernel could not read it either
        for entry in children:
            entries += 1
            if entries > MAX_ENTRIES:
                return _too_big(folder, limit)
            if entry.name.startswith(".") or entry.is_symlink():
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    if entry.name not in SKIPPED_DIRS and not _is_venv(entry.path):
                        pending.append((entry.path, f"{prefix}{entry.name}/"))
                elif entry.is_file(follow_symlinks=False):
                    size += entry.stat(follow_symlinks=False).st_size
                    found.append((entry.path, prefix + entry.name))
            except OSError:
                continue
            if size > limit or len(found) > MAX_FILES:
                return _too_big(folder, limit)
    if not found:
        return Packed()
    buffer = io.BytesIO()
    # Level 1: most of the size win for a fraction of the time; data files are often
    # compressed already.
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as tar:
        for path, name in found:
            try:
                tar.add(path, arcname=name, recursive=False)
            except OSError:
                continue  # vanished or unreadable since the walk
    return Packed(archive=buffer.getvalue(), files=len(found), size=size)


def _is_venv(path: str) -> bool:
    return os.path.exists(os.path.join(path, "pyvenv.cfg"))


def _too_big(folder: Path, limit: int) -> Packed:
    # Said to whoever runs the notebook; on a hub only the operator can change the
    # kernel's environment, so the sentence says where the setting lives.
    return Packed(
        skipped=(
            f"the files in {folder} exceed {limit / MIB:g} MiB or {MAX_FILES} files, so none"
            " were copied into the sandbox; to copy them, raise MODBOX_COPY_LIMIT (bytes) in"
            " the kernel's environment (the kernelspec's env, or on a hub the spawner's"
            " environment), or keep the notebook and its data in a smaller folder"
        )
    )
