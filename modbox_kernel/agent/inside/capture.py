"""Output capture: the pipes behind fds 1 and 2 become ``stream`` events.

``daemon.run_daemon`` calls :meth:`OutputCapture.install` once on the main thread,
before any other thread starts. A reader thread drains the pipes into the running
cell's events (``core.Agent.append_stream``); the main thread calls :meth:`drain`
before it records a non-stream event or finishes a cell, so order is kept.
"""

from __future__ import annotations

import codecs
import io
import logging
import os
import select
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional

from .dapclient import untraced

if TYPE_CHECKING:
    from .core import Agent

log = logging.getLogger("modbox.agent")

#: Bytes asked of a capture pipe per read, and the pipe size asked for: a cell that
#: prints megabytes then costs a few reads and wake-ups per megabyte, not sixteen.
READ_SIZE = 1024 * 1024


def _widen(fd: int) -> None:
    """Grow a pipe to READ_SIZE where Linux allows it (``pipe-max-size``, 1 MiB by
    default); elsewhere, or when refused, it keeps its 64 KiB."""
    try:
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), READ_SIZE)
    except (ImportError, OSError):
        pass


class _FdWriter(io.RawIOBase):
    """Raw writer for fd 1/2 that never loses bytes to a short write."""

    def __init__(self, fd: int, name: str) -> None:
        super().__init__()
        self._fd = fd
        self.name = name

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def write(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        total = 0
        while total < len(view):
            total += os.write(self._fd, view[total:])
        return total


class OutputCapture:
    """Owns the pipes behind fds 1 and 2 and turns their bytes into ``stream`` events.

    ``install`` is called once by the daemon's main thread before any other thread
    starts. A reader thread drains the pipes; the main thread calls ``drain`` before it
    records a non-stream event or finishes a cell, so order is kept.
    """

    def __init__(self, agent: Agent, log_fd: int) -> None:
        self.agent = agent
        self.log_fd = log_fd
        self.lock = threading.Lock()
        self.fds: Dict[int, str] = {}
        self.decoders: Dict[int, codecs.IncrementalDecoder] = {}
        self._libc_fflush: Optional[Callable[[Any], Any]] = None

    def install(self) -> None:
        for target, name in ((1, "stdout"), (2, "stderr")):
            r, w = os.pipe()
            _widen(w)
            os.dup2(w, target)
            os.close(w)
            os.set_blocking(r, False)
            self.fds[r] = name
            self.decoders[r] = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # Write-through text wrappers: a print reaches the pipe before the next
        # os.write(1, ...) of a C extension or subprocess, so one pipe keeps the order.
        sys.stdout = self._text_stream(1, "<stdout>")
        sys.stderr = self._text_stream(2, "<stderr>")
        thread = untraced(threading.Thread(target=self._reader, name="modbox-output", daemon=True))
        thread.start()

    @staticmethod
    def _text_stream(fd: int, name: str) -> io.TextIOWrapper:
        return io.TextIOWrapper(
            _FdWriter(fd, name),
            encoding="utf-8",
            errors="backslashreplace",
            write_through=True,
        )

    def _reader(self) -> None:
        fds = list(self.fds)
        while True:
            try:
                ready, _, _ = select.select(fds, [], [])
                with self.lock:
                    for fd in ready:
                        self.read_available(fd)
            except Exception:
                log.exception("output reader failed; retrying")
                time.sleep(0.1)

    def read_available(self, fd: int) -> None:
        """Read what the pipe holds right now (caller holds ``self.lock``)."""
        while True:
            try:
                data = os.read(fd, READ_SIZE)
            except BlockingIOError:
                return
            if not data:
                return
            text = self.decoders[fd].decode(data)
            if text:
                self._deliver(self.fds[fd], text)

    def _deliver(self, name: str, text: str) -> None:
        agent = self.agent
        cell = agent.current
        if cell is not None:
            agent.append_stream(cell, name, text)
        elif agent.ready.is_set():
            # Between cells (background threads, timers): the background log's.
            agent.append_stream(agent.background, name, text)
        else:
            # While the runner starts (IPython's import, startup files): the log's, as
            # the stock kernel's startup output goes to its terminal.
            try:
                os.write(self.log_fd, f"[{name} at start] {text}".encode())
            except OSError:
                pass

    def flush_c_stdio(self) -> None:
        """Flush C stdio buffers (printf in extensions) so their text joins this cell."""
        if self._libc_fflush is None:
            try:
                import ctypes

                self._libc_fflush = ctypes.CDLL(None).fflush
            except Exception:
                self._libc_fflush = lambda _ptr: None
        try:
            self._libc_fflush(None)
        except Exception:
            pass

    def drain(self) -> None:
        """Make everything written so far into events (main thread, synchronous)."""
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                if stream is not None:
                    stream.flush()
            except Exception:
                pass
        with self.lock:
            for fd in self.fds:
                self.read_available(fd)
