"""The notebook's folder, packed for the sandbox.

Who calls what, and when: Jupyter starts a kernel in the notebook's folder (JupyterLab,
nbclient, papermill and nbconvert all do), and a local kernel's cells read files there
(``pd.read_csv("data.csv")``). :meth:`modbox_kernel.session.SandboxSession._provision`
calls :func:`pack_folder` on that folder once per new sandbox, in a worker thread,
uploads the archive and unpacks it in the sandbox's working folder, so the same
relative paths work there. The folder copied may be an ancestor of the notebook's
(:func:`find_root`: a repository's root), so ``../data`` works too. What cells write
comes back through ``filesync``; ``copied`` records what was copied, so that a host
file changed since is never overwritten.

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
from dataclasses import dataclass, field
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
    # name in the archive -> (size, mtime_ns) on the host when packed: sync-back
    # (``hostfiles``) never overwrites a host file that changed since.
    copied: dict[str, tuple[int, int]] = field(default_factory=dict)
    root: str = ""  # the host folder packed: the notebook's, or an ancestor (copy_root)
    rel: str = ""  # the notebook's folder relative to ``root`` ("" when the same)


def pack_folder(root: str, limit: int) -> Packed:
    """Pack the copyable files below ``root`` (see the module docstring); blocking."""
    folder = Path(root).resolve()
    if folder == Path(folder.anchor):
        return Packed(
            skipped=f"{folder} is the root folder, so it was not copied into the sandbox;"
            " start the kernel in the notebook's own folder to have its files there"
        )
    found: list[tuple[str, str, os.stat_result]] = []  # (host path, archive name, stat)
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
                    st = entry.stat(follow_symlinks=False)
                    size += st.st_size
                    found.append((entry.path, prefix + entry.name, st))
            except OSError:
                continue
            if size > limit or len(found) > MAX_FILES:
                return _too_big(folder, limit)
    if not found:
        return Packed()
    buffer = io.BytesIO()
    # Level 1: most of the size win for a fraction of the time; data files are often
    # compressed already.
    copied: dict[str, tuple[int, int]] = {}
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as tar:
        for path, name, st in found:
            try:
                tar.add(path, arcname=name, recursive=False)
            except OSError:
                continue  # vanished or unreadable since the walk
            copied[name] = (st.st_size, st.st_mtime_ns)
    return Packed(archive=buffer.getvalue(), files=len(found), size=size, copied=copied)


def find_root(folder: str, setting: str) -> str:
    """The host folder to copy for a notebook in ``folder`` (MODBOX_COPY_ROOT).

    ``folder``: the notebook's folder alone. ``auto``: the nearest folder at or above
    it that holds ``.git`` (a repository's notebooks read ``../data``), else the
    notebook's folder. A path: that folder, if it is the notebook's or an ancestor
    (the caller checked it is). The root folder ``/`` is never chosen.
    """
    here = Path(folder).resolve()
    if setting == "folder":
        return str(here)
    if setting not in ("", "auto"):
        return str(Path(setting).resolve())
    for candidate in (here, *here.parents):
        if candidate == Path(candidate.anchor):
            break
        if (candidate / ".git").exists():
            return str(candidate)
    return str(here)


def pack_for(folder: str, setting: str, limit: int) -> Packed:
    """Pack the copy root of ``folder`` (:func:`find_root`); when an automatic root is
    over the limits, the notebook's folder alone (blocking)."""
    root = find_root(folder, setting)
    packed = pack_folder(root, limit)
    here = str(Path(folder).resolve())
    if packed.skipped and root != here and setting in ("", "auto"):
        root, packed = here, pack_folder(here, limit)
    packed.root = root
    packed.rel = os.path.relpath(here, root) if here != root else ""
    return packed


def check_root(folder: str, setting: str) -> str | None:
    """Why MODBOX_COPY_ROOT cannot be used for ``folder``, or None when it can."""
    if setting in ("", "auto", "folder"):
        return None
    root, here = Path(setting), Path(folder).resolve()
    if not root.is_absolute():
        return f"MODBOX_COPY_ROOT={setting!r} is not an absolute path"
    root = root.resolve()
    if root != here and root not in here.parents:
        return (
            f"MODBOX_COPY_ROOT={setting!r} does not contain the notebook's folder {here}; "
            "it must be that folder or one above it"
        )
    if root == Path(root.anchor):
        return "MODBOX_COPY_ROOT='/' would copy the whole machine; name a smaller folder"
    return None


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
