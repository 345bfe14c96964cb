"""``jupyter console --kernel modbox-python`` in a real pseudo-terminal.

The console runs under pexpect with its full prompt_toolkit interface (no
``--simple-prompt``), and the test types as a person would: Enter, Ctrl-C, ``exit``.
What the terminal shows is read with the escape sequences removed. The kernel uses the
embedded backend, so its process tree (kernel, embedded service, the sandbox's jail)
is what must be gone after ``exit``.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator

import pexpect
import psutil
import pytest
from kernel_helpers import KERNEL_NAME, embedded_env

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(180)]

# CSI sequences, OSC sequences (titles), and the short keypad and charset ones.
ANSI = re.compile(
    r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[=>()][0-9A-B]?"
)


class Terminal:
    """A console in a pty: what it printed so far (escape sequences removed), with times."""

    def __init__(self, child: pexpect.spawn) -> None:
        self.child = child
        self.chunks: list[tuple[float, str]] = []

    @property
    def text(self) -> str:
        return ANSI.sub("", "".join(chunk for _, chunk in self.chunks))

    def read_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                chunk = self.child.read_nonblocking(65536, timeout=0.1)
            except pexpect.TIMEOUT:
                continue
            except pexpect.EOF:
                return
            self.chunks.append((time.monotonic(), chunk))

    def wait_for(self, pattern: str, timeout: float = 60, *, since: int = 0) -> float:
        """Read until ``pattern`` shows after character ``since``; when it first showed."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            seen = ""
            for at, chunk in self.chunks:
                seen = ANSI.sub("", seen + chunk) if "\x1b" in chunk else seen + chunk
                if regex.search(seen, since):
                    return at
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} never showed; the terminal:\n{self.text}")
            self.read_for(0.2)

    def type(self, line: str) -> int:
        """Type ``line`` and Enter; returns where the answer starts in :attr:`text`."""
        start = len(self.text)
        self.child.send(line + "\r")
        return start


@pytest.fixture
def console() -> Iterator[Terminal]:
    env = {**embedded_env(), "TERM": "xterm-256color"}
    child = pexpect.spawn(
        sys.executable,
        ["-m", "jupyter", "console", "--kernel", KERNEL_NAME],
        env=env,
        encoding="utf-8",
        dimensions=(50, 160),
    )
    try:
        yield Terminal(child)
    finally:
        if child.isalive():
            child.terminate(force=True)


def test_the_console_runs_streams_interrupts_and_exits_cleanly(console: Terminal) -> None:
    console.wait_for(r"Modbox Python \d+\.\d+\.\d+: every cell runs in an isolated Modbox sandbox")
    console.wait_for(r"In \[1\]:")
    at = console.type("x = 41")
    console.wait_for(r"In \[2\]:", since=at)
    at = console.type("x + 1")
    console.wait_for(r"Out\[2\]: 42", since=at)

    # A loop whose lines must appear while it runs, not all at its end.
    at = console.type("import time")
    console.wait_for(r"In \[4\]:", since=at)
    at = console.type("for i in range(4): print('tick', i, flush=True); time.sleep(1)")
    console.child.send("\r")  # a compound statement: one more Enter ends it
    first = console.wait_for(r"tick 0", since=at)
    last = console.wait_for(r"tick 3", since=at)
    assert last - first > 2.0, f"the lines arrived together ({last - first:.2f} s apart)"
    console.wait_for(r"In \[5\]:", since=at)

    # Ctrl-C stops the cell in the sandbox; the namespace survives.
    at = console.type("time.sleep(60)")
    time.sleep(2.0)
    pressed = time.monotonic()
    console.child.sendintr()
    shown = console.wait_for(r"KeyboardInterrupt", timeout=20, since=at)
    assert shown - pressed < 5.0, f"the interrupt took {shown - pressed:.2f} s"
    at = console.type("x")
    console.wait_for(r"Out\[\d+\]: 41", since=at)

    # exit ends the console, the kernel, its embedded service and the sandbox.
    tree = psutil.Process(console.child.pid).children(recursive=True)
    names = " ".join(" ".join(p.cmdline()) for p in tree)
    assert "modbox_kernel.local" in names and "modbox_kernel" in names, names
    console.type("exit")
    console.child.expect(pexpect.EOF, timeout=30)
    _, alive = psutil.wait_procs(tree, timeout=20)
    assert alive == [], [" ".join(p.cmdline()) for p in alive]
