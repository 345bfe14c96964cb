"""The working folder: where cells run, which files they changed, and reading them.

Who calls what, and when: once the notebook's folder is unpacked, the kernel sends
``workdir`` (``ops``), which moves the agent into the folder and takes the first
look at its files. After each cell, ``core`` calls :meth:`Tracker.after_cell` and
puts what it returns into the cell's ``done`` event as ``files``: a cell that
writes nothing costs the kernel no extra request. The kernel then reads the changed
files with ``read`` and, for ``%modbox push``, writes with ``write``; ``list`` names
the files below a path for ``%modbox pull``.

Nothing here decides what reaches the host: the kernel checks every name, size and
path again on its side (this code runs where the notebook's code runs, and that code
could replace it). What is looked at matches the copy into the sandbox: hidden
names, ``__pycache__``, ``node_modules`` and virtual environments are left out.
Links and special files are reported, never read.
"""

from __future__ import annotations

import base64
import os
import stat
import threading
from typing import Any, Dict, List, Optional, Tuple

#: Entries a look at the folder reads at most: past it the folder is no longer
#: tracked (one ``overflow`` report), so a cell that makes 100,000 files costs one
#: bounded walk, not one per later cell.
MAX_ENTRIES = 20_000
SKIPPED_DIRS = frozenset({"__pycache__", "node_modules"})
#: The most bytes one ``read`` answer carries (before base64).
MAX_READ_BYTES = 2 * 1024 * 1024
#: The most files one ``list`` answer names.
MAX_LISTED = 5000

Signature = Tuple[Any, ...]


def scan(
    root: str, *, hidden: bool = False, dirs: Optional[List[str]] = None
) -> Tuple[Dict[str, Signature], bool]:
    """(relative path → signature, overflowed) for what is below ``root``.

    A regular file's signature is ("f", size, mtime_ns, inode); a link's ("l",
    target); anything else ("s", mode). Folders are walked, not listed; with ``dirs``,
    each folder walked is appended to it.
    """
    found: Dict[str, Signature] = {}
    entries = 0
    pending = [(root, "")]
    while pending:
        directory, prefix = pending.pop()
        if dirs is not None:
            dirs.append(directory)
        try:
            with os.scandir(directory) as listing:
                children = list(listing)
        except OSError:
            continue
        for entry in children:
            entries += 1
            if entries > MAX_ENTRIES:
                return found, True
            name = entry.name
            if not hidden and name.startswith("."):
                continue
            rel = prefix + name
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISLNK(st.st_mode):
                try:
                    found[rel] = ("l", os.readlink(entry.path))
                except OSError:
                    found[rel] = ("l", "")
            elif stat.S_ISDIR(st.st_mode):
                if hidden or (
                    name not in SKIPPED_DIRS
                    and not os.path.exists(os.path.join(entry.path, "pyvenv.cfg"))
                ):
                    pending.append((entry.path, rel + "/"))
            elif stat.S_ISREG(st.st_mode):
                found[rel] = ("f", st.st_size, st.st_mtime_ns, st.st_ino)
            else:
                found[rel] = ("s", st.st_mode)
    return found, False


class Watcher:
    """Linux's inotify on the tracked folders: whether anything there may have changed.

    A look at the folder costs a walk (about 1 ms per 200 files); after a cell that
    wrote nothing, the empty event queue says so without one. Events only make the
    next look walk: the walk decides what changed. Where inotify is unavailable
    (no ctypes, not Linux, no instance or watch left for this uid), :attr:`usable`
    is false and every look walks. Writes through ``mmap`` raise no event; they are
    seen by the next look that walks.
    """

    # IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE
    # | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF
    MASK = 0x2 | 0x4 | 0x8 | 0x40 | 0x80 | 0x100 | 0x200 | 0x400 | 0x800
    IN_NONBLOCK_CLOEXEC = 0o4000 | 0o2000000

    def __init__(self) -> None:
        self.usable = False
        self._fd = -1
        try:
            import ctypes

            self._libc = ctypes.CDLL(None, use_errno=True)
            fd = self._libc.inotify_init1(self.IN_NONBLOCK_CLOEXEC)
        except (ImportError, OSError, AttributeError):
            return
        if fd >= 0:
            self._fd, self.usable = fd, True

    def watch(self, dirs: List[str]) -> None:
        """Watch these folders (again: a folder watched already keeps its watch)."""
        if not self.usable:
            return
        for directory in dirs:
            if self._libc.inotify_add_watch(self._fd, os.fsencode(directory), self.MASK) < 0:
                self.usable = False  # out of watches: walk every time from now on
                return

    def changed(self) -> bool:
        """Whether any event arrived since the last call (the queue is emptied)."""
        if not self.usable:
            return True
        seen = False
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                return seen
            except OSError:
                self.usable = False
                return True
            if not data:
                return seen
            seen = True


class Tracker:
    """What changed below the working root since the last look."""

    def __init__(self) -> None:
        self.root: Optional[str] = None
        self.per_cell = False  # look after every cell (else only when asked)
        self._seen: Dict[str, Signature] = {}
        self._overflowed = False
        self._lock = threading.Lock()  # the main thread and a request may both look
        self._watcher: Optional[Watcher] = None

    def set_root(self, root: str, per_cell: bool) -> int:
        """Start tracking ``root`` (its current files are the baseline); file count."""
        with self._lock:
            self.root, self.per_cell = root, per_cell
            if self._watcher is None:
                self._watcher = Watcher()
            self._look(root)
            return sum(1 for sig in self._seen.values() if sig[0] == "f")

    def _look(self, root: str) -> Tuple[Dict[str, Signature], bool]:
        """Walk ``root`` and (re)watch its folders; the walk's result becomes the last
        look. The queue is emptied first: only events after this walk count."""
        watcher = self._watcher
        if watcher is not None:
            watcher.changed()
        dirs: List[str] = []
        previous = self._seen
        self._seen, self._overflowed = scan(root, dirs=dirs)
        if watcher is not None and not self._overflowed:
            watcher.watch(dirs)
        return previous, self._overflowed

    def note(self, path: str) -> None:
        """A file the kernel wrote (``%modbox push``): not a change a cell made."""
        with self._lock:
            root = self.root
            full = os.path.abspath(path)
            if root is None or not full.startswith(root.rstrip("/") + "/"):
                return
            try:
                st = os.lstat(full)
            except OSError:
                return
            if stat.S_ISREG(st.st_mode):
                rel = full[len(root.rstrip("/")) + 1 :]
                self._seen[rel] = ("f", st.st_size, st.st_mtime_ns, st.st_ino)

    def after_cell(self) -> Optional[Dict[str, Any]]:
        """The ``files`` field of a ``done`` event, or None (nothing changed)."""
        if not self.per_cell:
            return None
        return self.changes()

    def changes(self) -> Optional[Dict[str, Any]]:
        """Files created or changed since the last look (regular ones to copy, links and
        special files to report), or the one ``overflow`` report; None when nothing."""
        with self._lock:
            if self.root is None or self._overflowed:
                return None
            if self._watcher is not None and not self._watcher.changed():
                return None  # no event below the root: nothing to walk for
            before, overflowed = self._look(self.root)
            if overflowed:
                return {"changed": [], "skipped": [], "overflow": MAX_ENTRIES}
            now = self._seen
            changed: List[Dict[str, Any]] = []
            skipped: List[Dict[str, Any]] = []
            for rel in sorted(now):
                sig = now[rel]
                if before.get(rel) == sig:
                    continue
                if sig[0] == "f":
                    changed.append({"path": rel, "size": sig[1]})
                else:
                    skipped.append({"path": rel, "why": "link" if sig[0] == "l" else "special"})
            if not changed and not skipped:
                return None
            return {"changed": changed, "skipped": skipped}


def change_dir(req: Dict[str, Any], tracker: Tracker) -> Dict[str, Any]:
    """``workdir``: make and enter ``cwd``; track ``root`` (default: cwd)."""
    cwd = req.get("cwd")
    if not isinstance(cwd, str) or not os.path.isabs(cwd):
        return {"ok": False, "error": "workdir needs an absolute 'cwd'"}
    root = req.get("root") if isinstance(req.get("root"), str) else cwd
    try:
        os.makedirs(cwd, exist_ok=True)
        os.chdir(cwd)
    except OSError as exc:
        return {"ok": False, "error": f"cannot enter {cwd}: {exc}"}
    files = tracker.set_root(os.path.abspath(str(root)), bool(req.get("track", True)))
    return {"ok": True, "cwd": os.getcwd(), "files": files}


def _open_regular(path: str) -> Tuple[int, os.stat_result]:
    """Open a regular file without following a final link or blocking on a FIFO."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise OSError(f"{path} is not a regular file")
    return fd, st


def read_files(req: Dict[str, Any]) -> Dict[str, Any]:
    """``read``: chunks of ``files`` ([{path, offset}]), at most ``limit`` bytes in all.

    Each chunk says the file's size when it was opened and whether it ends there; a
    file that cannot be read gets ``error`` instead.
    """
    wanted = req.get("files")
    if not isinstance(wanted, list):
        return {"ok": False, "error": "read needs a 'files' list"}
    budget = min(MAX_READ_BYTES, max(1, int(req.get("limit") or MAX_READ_BYTES)))
    chunks: List[Dict[str, Any]] = []
    for item in wanted:
        if budget <= 0:
            break
        path = str(item.get("path", "")) if isinstance(item, dict) else ""
        offset = max(0, int(item.get("offset") or 0)) if isinstance(item, dict) else 0
        try:
            fd, st = _open_regular(path)
        except OSError as exc:
            chunks.append({"path": path, "error": exc.strerror or str(exc)})
            continue
        try:
            data = os.pread(fd, min(budget, max(0, st.st_size - offset)), offset)
        except OSError as exc:
            chunks.append({"path": path, "error": exc.strerror or str(exc)})
            continue
        finally:
            os.close(fd)
        budget -= len(data)
        chunks.append(
            {
                "path": path,
                "offset": offset,
                "size": st.st_size,
                "data": base64.b64encode(data).decode("ascii"),
                "eof": offset + len(data) >= st.st_size,
            }
        )
    return {"ok": True, "chunks": chunks}


def list_files(req: Dict[str, Any]) -> Dict[str, Any]:
    """``list``: the regular files at or below ``path`` (hidden ones too), for a pull."""
    path = req.get("path")
    if not isinstance(path, str) or not path:
        return {"ok": False, "error": "list needs a 'path'"}
    full = os.path.abspath(path)
    try:
        st = os.lstat(full)
    except OSError as exc:
        return {"ok": False, "error": f"{path}: {exc.strerror or exc}"}
    if stat.S_ISREG(st.st_mode):
        return {
            "ok": True,
            "path": full,
            "kind": "file",
            "files": [{"path": "", "size": st.st_size}],
        }
    if not stat.S_ISDIR(st.st_mode):
        return {"ok": False, "error": f"{path} is not a regular file or a folder"}
    found, overflowed = scan(full, hidden=True)
    files = [{"path": rel, "size": sig[1]} for rel, sig in sorted(found.items()) if sig[0] == "f"]
    skipped = [rel for rel, sig in sorted(found.items()) if sig[0] != "f"]
    return {
        "ok": True,
        "path": full,
        "kind": "folder",
        "files": files[:MAX_LISTED],
        "skipped": skipped[:100],
        "more": overflowed or len(files) > MAX_LISTED,
    }


def write_file(req: Dict[str, Any], tracker: Tracker) -> Dict[str, Any]:
    """``write``: ``data`` (base64) at ``offset`` of ``path``; offset 0 starts the file
    afresh (its folders are made). Never writes through a final link."""
    path, data = req.get("path"), req.get("data")
    if not isinstance(path, str) or not path or not isinstance(data, str):
        return {"ok": False, "error": "write needs a 'path' and 'data'"}
    offset = max(0, int(req.get("offset") or 0))
    flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        if offset == 0:
            parent = os.path.dirname(os.path.abspath(path))
            os.makedirs(parent, exist_ok=True)
            flags |= os.O_CREAT | os.O_TRUNC
        fd = os.open(path, flags, 0o644)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return {"ok": False, "error": f"{path} is not a regular file"}
            os.pwrite(fd, base64.b64decode(data), offset)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
    except (OSError, ValueError) as exc:
        return {"ok": False, "error": f"{path}: {getattr(exc, 'strerror', None) or exc}"}
    tracker.note(path)
    return {"ok": True, "size": size}
