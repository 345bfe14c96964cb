"""Host-side file operations on a sandbox workspace that no planted link can redirect.

Who calls it: the runtime file routes (``routes_runtime``), in a worker thread (every
function here blocks).

Why so careful: the workspace is writable by sandbox code, which can replace any path
component with a symlink to a host file and wait for the service to follow it (the
Judge0 CVE-2024-28185/28189 pattern; ``docs/isolation.md``, "Files API path
checks"). So:

* every walk starts from the workspace's directory fd (handed over by the sandbox's
  supervisor; under bwrap the workspace is a tmpfs that exists only in the jail) and
  goes one component at a time with ``O_NOFOLLOW`` (a symlink anywhere fails with
  ``ELOOP``/``ENOTDIR``); ``..`` is refused outright;
* when the service runs as root and the sandbox does not, every operation runs with
  the sandbox's uid/gid as the thread's filesystem ids (:func:`acting_as`): the service
  then has exactly the sandbox's own rights on its files (no CAP_DAC_OVERRIDE), and new
  files belong to the sandbox. (It is also required: a tmpfs workspace made by bwrap
  belongs to the sandbox's user namespace, where uid 0 is unmapped, and creating a
  file there as fsuid 0 fails with EOVERFLOW.);
* uploads are written to a fresh temporary name and renamed into place (never writing
  into an existing inode, which could be a hard link);
* downloads check the final object on the open fd: a regular file, one link only (a
  hard link to a file the sandbox could not read itself is not served), and no bigger
  than the download limit;
* listings and the upload directory are bounded in entries, uploads in size, and a
  full workspace is a clear 409, not a 500.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import BinaryIO

from .envelope import ServiceError, validation_error
from .units import human_bytes

_libc = ctypes.CDLL(None, use_errno=True)

UPLOADS_DIR = "uploads"
CHUNK = 1024 * 1024
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class Workspace:
    """A workspace: a directory fd of it, and the path its sandbox sees it at.

    ``root_fd`` belongs to whoever built this (a route closes it after the request);
    nothing here closes it. ``owner`` is the sandbox's uid/gid when the service runs as
    root and the sandbox does not: operations then run under :func:`acting_as`.
    """

    root_fd: int
    visible_root: str  # "/workspace" under bwrap; the host path in none mode
    owner: tuple[int, int] | None = None

    def visible(self, parts: list[str]) -> str:
        return "/".join([self.visible_root.rstrip("/"), *parts]) if parts else self.visible_root


@contextlib.contextmanager
def acting_as(owner: tuple[int, int] | None) -> Iterator[None]:
    """Use ``owner`` as this thread's filesystem uid/gid for the duration.

    setfsuid/setfsgid change only the calling thread (glibc does not broadcast them to
    other threads, unlike setuid), so a worker thread can act as the sandbox while the
    rest of the service stays root. Leaving fsuid 0 also drops the file capabilities
    from the thread's effective set; going back restores them.
    """
    if owner is None:
        yield
        return
    uid, gid = owner
    old_gid = _libc.setfsgid(gid)
    old_uid = _libc.setfsuid(uid)
    try:
        if _libc.setfsuid(-1) != uid or _libc.setfsgid(-1) != gid:
            raise ServiceError(500, "internal_error", "Could not act as the sandbox's user.")
        yield
    finally:
        _libc.setfsuid(old_uid)
        _libc.setfsgid(old_gid)


def split_path(visible_root: str, path: str | None, field: str = "query.path") -> list[str]:
    """Turn a caller's path (relative, or absolute under the workspace) into components."""
    raw = path or ""
    if "\0" in raw:
        raise validation_error(field, "contains a NUL byte")
    root = visible_root.rstrip("/")
    if raw.startswith("/"):
        if raw != root and not raw.startswith(root + "/"):
            raise _outside(raw)
        raw = raw[len(root) :]
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _outside(path or "")
    return parts


def _outside(path: str) -> ServiceError:
    return ServiceError(
        403,
        "forbidden",
        f"Path {path!r} is outside the sandbox workspace.",
        hint="Use a path relative to the workspace, without '..'.",
    )


def _not_found(ws: Workspace, parts: list[str]) -> ServiceError:
    return ServiceError(404, "not_found", f"No such file or directory: {ws.visible(parts)}")


@contextlib.contextmanager
def _answering(
    ws: Workspace, parts: list[str], conflicts: tuple[int, ...], conflict: str
) -> Iterator[None]:
    """Turn the OS's refusal of one step on ``parts`` into the API's answer.

    A missing name is a 404; an errno in ``conflicts`` (what the sandbox planted in
    the way: a link, a non-directory, a full directory) is a 409 saying ``conflict``;
    anything else is the service's own fault and propagates (a 500).
    """
    try:
        yield
    except FileNotFoundError:
        raise _not_found(ws, parts) from None
    except OSError as exc:
        if exc.errno in conflicts:
            raise ServiceError(409, "conflict", conflict) from None
        raise


@contextlib.contextmanager
def _walk(ws: Workspace, parts: list[str]) -> Iterator[int]:
    """Yield an fd of the directory ``parts`` (never through a symlink)."""
    fd = os.open(".", _DIR_FLAGS, dir_fd=ws.root_fd)
    try:
        for i, name in enumerate(parts):
            so_far = parts[: i + 1]
            not_a_dir = (
                f"{ws.visible(so_far)} is not a directory (symbolic links are not followed)."
            )
            with _answering(ws, so_far, (errno.ELOOP, errno.ENOTDIR), not_a_dir):
                nxt = os.open(name, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
        yield fd
    finally:
        os.close(fd)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat()


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def list_dir(ws: Workspace, parts: list[str], limit: int) -> dict[str, object]:
    """Entries of a directory (lstat: links are listed as links, never followed).

    At most ``limit`` entries (``truncated`` says whether there were more): a sandbox
    can create millions of files, and the answer must stay small.
    """
    with _walk(ws, parts) as fd:
        names, truncated = _bounded_names(fd, limit)
        entries = []
        for name in sorted(names):
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            entries.append(
                {
                    "name": name,
                    "path": ws.visible([*parts, name]),
                    "type": _kind(st.st_mode),
                    "size": st.st_size,
                    "modified": _iso(st.st_mtime),
                }
            )
    return {
        "path": ws.visible(parts),
        "entries": entries,
        "total": len(entries),
        "truncated": truncated,
    }


def _bounded_names(dir_fd: int, limit: int) -> tuple[list[str], bool]:
    # A fresh open of the directory: scandir must not move the offset of ``dir_fd``.
    fd = os.open(".", _DIR_FLAGS, dir_fd=dir_fd)
    names: list[str] = []
    try:
        with os.scandir(fd) as it:
            for entry in it:
                if len(names) >= limit:
                    return names, True
                names.append(entry.name)
    finally:
        os.close(fd)
    return names, False


def open_file(ws: Workspace, parts: list[str], limit: int) -> tuple[int, int]:
    """Open a regular file for reading; returns (fd, size). The caller closes the fd."""
    if not parts:
        raise validation_error("query.path", "names a directory, not a file")
    a_link = f"{ws.visible(parts)} is a symbolic link; not followed."
    with _walk(ws, parts[:-1]) as dir_fd, _answering(ws, parts, (errno.ELOOP,), a_link):
        # O_NONBLOCK: a FIFO planted by the sandbox must not hang us in open().
        fd = os.open(
            parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
        )
    st = os.fstat(fd)
    refusal = None
    if not stat.S_ISREG(st.st_mode):
        refusal = f"{ws.visible(parts)} is not a regular file."
    elif st.st_nlink > 1:
        refusal = f"{ws.visible(parts)} has {st.st_nlink} hard links; it is not served."
    elif st.st_size > limit:
        refusal = (
            f"{ws.visible(parts)} is {human_bytes(st.st_size)}, more than the download "
            f"limit of {human_bytes(limit)}."
        )
    if refusal is not None:
        os.close(fd)
        raise ServiceError(409, "conflict", refusal)
    os.set_blocking(fd, True)
    return fd, st.st_size


class FileChunks:
    """An fd from :func:`open_file`, read chunk by chunk in worker threads, closed once.

    The download route streams it. A client that hangs up mid-download stops the
    stream without finishing the iteration, so the fd must be closed by the response
    itself (:meth:`close`); but a worker thread may be inside ``os.read`` at that
    moment, and closing under it could let the number be reused by another open and
    read. The lock makes the close wait for that read to end.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()
        self._closed = False

    def read(self) -> bytes:
        """The next chunk, ``b""`` at the end (which closes the fd) or once closed."""
        with self._lock:
            if self._closed:
                return b""
            chunk = os.read(self._fd, CHUNK)
            if not chunk:
                self._close_locked()
            return chunk

    def close(self) -> None:
        """Close the fd if nothing did yet; blocks while a read is in progress."""
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)


def upload_name(filename: str | None) -> str:
    """The basename an upload is stored under (client paths are reduced to the last part)."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    if name in ("", ".", "..") or "\0" in name:
        raise validation_error("body.file", "needs a file name")
    return name


def store_upload(
    ws: Workspace, name: str, source: BinaryIO, limit: int, count_limit: int
) -> dict[str, object]:
    """Copy ``source`` to ``uploads/<name>`` atomically; returns the upload answer."""
    with _walk(ws, []) as root_fd:
        with contextlib.suppress(FileExistsError):
            os.mkdir(UPLOADS_DIR, 0o755, dir_fd=root_fd)
    with _walk(ws, [UPLOADS_DIR]) as dir_fd:
        names, more = _bounded_names(dir_fd, count_limit)
        if more or (len(names) >= count_limit and name not in names):
            raise ServiceError(
                409,
                "conflict",
                f"{ws.visible([UPLOADS_DIR])} already holds {count_limit} files, the limit.",
                hint="Delete uploads you no longer need.",
            )
        tmp = f".modbox-upload-{secrets.token_hex(8)}"
        fd = os.open(
            tmp,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o644,
            dir_fd=dir_fd,
        )
        size = 0
        try:
            with os.fdopen(fd, "wb", closefd=True) as out:
                while chunk := source.read(CHUNK):
                    size += len(chunk)
                    if size > limit:
                        raise too_large(limit)
                    out.write(chunk)
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            if isinstance(exc, IsADirectoryError | NotADirectoryError):
                raise ServiceError(
                    409, "conflict", f"{ws.visible([UPLOADS_DIR, name])} is a directory."
                ) from None
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ServiceError(
                    409,
                    "conflict",
                    "The sandbox's workspace is full (its size is capped); the upload "
                    "was not stored.",
                    hint="Delete files in the workspace, or ask for a larger workspace.",
                ) from None
            raise
    return {
        "success": True,
        "path": ws.visible([UPLOADS_DIR, name]),
        "filename": name,
        "size": size,
    }


def delete(ws: Workspace, parts: list[str]) -> dict[str, object]:
    """Remove a file, a symlink (the link itself) or an empty directory."""
    if not parts:
        raise ServiceError(403, "forbidden", "The workspace itself cannot be deleted.")
    not_empty = f"Directory {ws.visible(parts)} is not empty."
    with _walk(ws, parts[:-1]) as dir_fd, _answering(ws, parts, (errno.ENOTEMPTY,), not_empty):
        st = os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            os.rmdir(parts[-1], dir_fd=dir_fd)
        else:
            os.unlink(parts[-1], dir_fd=dir_fd)
    return {"success": True, "path": ws.visible(parts)}


def too_large(limit: int) -> ServiceError:
    return ServiceError(
        413,
        "validation_error",
        f"The request body is larger than the limit of {limit} bytes.",
        retryable=False,
    )
