"""Writing files that came from the sandbox into the notebook's folder on the host.

Who calls what, and when: ``filesync`` makes one :class:`HostFolder` per sandbox (for
the folder that was copied in, with the record of what was copied) and calls
:meth:`HostFolder.open_new` for each file it brings back; the returned
:class:`Incoming` takes the file's bytes as they arrive and :meth:`Incoming.commit`
puts it in place.

Everything a sandbox names is untrusted: the code that sent it runs where the
notebook's code runs. So the checks live here, on the host, whatever the agent
claims. A name must be relative, with no ``..``, empty, hidden or over-long part.
Each folder on the way is opened from the one before without following links
(``O_NOFOLLOW`` with ``dir_fd``), so a link planted on the host side cannot lead
the write elsewhere. The bytes go to a new temporary file beside the target and are
renamed over it: the target itself is never opened for writing, so even a link
there is replaced, not followed. A host file that changed since it was copied in
(or since the kernel last wrote it, or that was never copied in) is left alone:
:class:`Conflict` says so, and the caller keeps the sandbox's version out.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat

# The longest name part and path the host writes (Linux's NAME_MAX and a sane bound).
MAX_PART = 255
MAX_PATH = 4096


class Refused(Exception):
    """The sandbox's file may not be written on the host: the message says why."""


class Conflict(Refused):
    """The host's file changed since the sandbox got its copy: it is kept."""


def safe_parts(name: object, *, hidden: bool = False) -> tuple[str, ...]:
    """The parts of a relative name that stays inside its folder; Refused otherwise.
    Hidden parts are refused too, unless ``hidden`` (an explicit ``%modbox pull``)."""
    if not isinstance(name, str) or not name or len(name) > MAX_PATH:
        raise Refused("not a usable file name")
    if "\x00" in name or name.startswith("/"):
        raise Refused("an absolute or malformed path")
    parts = tuple(name.split("/"))
    for part in parts:
        if part in ("", ".", ".."):
            raise Refused("a path that leaves its folder")
        if part.startswith(".") and not hidden:
            raise Refused("a hidden name (hidden files are not copied back)")
        if len(part.encode("utf-8", "surrogateescape")) > MAX_PART:
            raise Refused("a name part longer than 255 bytes")
    return parts


class Incoming:
    """One file on its way in: a temporary file in the target's folder."""

    def __init__(self, folder: HostFolder, name: str, dir_fd: int, leaf: str) -> None:
        self._folder = folder
        self.name = name
        self._dir_fd = dir_fd
        self._leaf = leaf
        self._tmp = f".{leaf[:200]}.modbox-{secrets.token_hex(4)}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        self._fd = os.open(self._tmp, flags, 0o666, dir_fd=dir_fd)
        self.written = 0

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        self.written += len(data)

    def commit(self, *, replace: bool = False) -> None:
        """Rename over the target, unless the host's copy changed (Conflict); with
        ``replace`` (an explicit pull) a changed host file is replaced too."""
        try:
            self._folder.check_unchanged(self.name, self._dir_fd, self._leaf, replace)
            os.rename(self._tmp, self._leaf, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
            st = os.fstat(self._fd)
            self._folder.known[self.name] = (st.st_size, st.st_mtime_ns)
            self._tmp = ""
        finally:
            self.close()

    def close(self) -> None:
        """Drop the file (a no-op after commit)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._tmp:
            with contextlib.suppress(OSError):
                os.unlink(self._tmp, dir_fd=self._dir_fd)
            self._tmp = ""
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1


class HostFolder:
    """The host folder a sandbox's working folder mirrors."""

    def __init__(self, root: str, copied: dict[str, tuple[int, int]]) -> None:
        self.root = os.path.realpath(root)
        # name -> (size, mtime_ns) of the host file as the sandbox last had it.
        self.known = dict(copied)

    def open_new(self, name: str, *, hidden: bool = False) -> Incoming:
        """Start writing ``name`` (folders are made); Refused when it may not be."""
        parts = safe_parts(name, hidden=hidden)
        dir_fd = self._open_folder(parts[:-1])
        try:
            return Incoming(self, name, dir_fd, parts[-1])
        except OSError as exc:
            os.close(dir_fd)
            raise Refused(f"cannot write it ({exc.strerror or exc})") from exc

    def check_unchanged(self, name: str, dir_fd: int, leaf: str, replace: bool) -> None:
        try:
            st = os.stat(leaf, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return  # new on the host: nothing to lose
        if stat.S_ISDIR(st.st_mode):
            raise Refused("the host has a folder of that name")
        if replace:
            return
        if not stat.S_ISREG(st.st_mode):
            raise Conflict("the host has something other than a file there")
        if self.known.get(name) != (st.st_size, st.st_mtime_ns):
            raise Conflict("the host's copy changed since the sandbox got it")

    def _open_folder(self, parts: tuple[str, ...]) -> int:
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(self.root, flags)
        try:
            for part in parts:
                try:
                    child = os.open(part, flags, dir_fd=fd)
                except FileNotFoundError:
                    os.mkdir(part, 0o777, dir_fd=fd)
                    child = os.open(part, flags, dir_fd=fd)
                os.close(fd)
                fd = child
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # a link or a file on the way
                raise Refused("a folder on its path is a link or a file on the host") from exc
            raise Refused(f"cannot make its folder ({exc.strerror or exc})") from exc
        return fd
