"""Shared machinery for the end-to-end kernel tests.

Who calls what: ``tests/test_kernel_*.py`` and ``tests/test_notebooks_*.py`` import this
module. They build the environment a kernel is launched with (:func:`service_env` to
reuse the session's shared local Modbox service, :func:`embedded_env` to make the kernel
start its own), start kernels through jupyter_client (:func:`start_kernel`), run cells
while recording when each IOPub message arrived (:func:`run_cell`), run whole notebooks
through nbclient (:func:`execute_notebook`) and reduce notebook outputs to a form in which
``modbox-python`` and the stock ``python3`` kernel must agree (:func:`normalise_notebook`).
The leak tests use :func:`list_sandboxes` and :func:`sandbox_processes`.

``MODBOX_TEST_KERNEL`` (default ``modbox-python``) names the kernel under test. It exists
to debug these harnesses against the stock ``python3`` kernel; CI never sets it.
"""

from __future__ import annotations

import base64
import os
import queue
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import nbformat
import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager, start_new_kernel
from nbclient import NotebookClient

KERNEL_NAME = os.environ.get("MODBOX_TEST_KERNEL", "modbox-python")
REFERENCE_KERNEL = "python3"
# The first cell of a modbox kernel waits for its sandbox; kernel_info must come at once,
# but a loaded 2-core CI machine can still be slow to launch the process itself.
STARTUP_TIMEOUT = 120
REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
_MODBOX_VARS = ("MODBOX_API_URL", "MODBOX_API_TOKEN", "MODBOX_BACKEND")


def is_modbox(kernel_name: str = KERNEL_NAME) -> bool:
    return kernel_name != REFERENCE_KERNEL


# --------------------------------------------------------------------------- environments


def embedded_env() -> dict[str, str]:
    """Environment in which a modbox kernel starts its own embedded local service.

    ``PYTEST_CURRENT_TEST`` is dropped too: ipykernel turns off its capture of fds 1
    and 2 when it sees that variable, and the reference kernel must behave as it does
    for users.
    """
    dropped = (*_MODBOX_VARS, "PYTEST_CURRENT_TEST")
    return {k: v for k, v in os.environ.items() if k not in dropped}


def service_env(base_url: str, token: str) -> dict[str, str]:
    """Environment in which a modbox kernel uses an already running service."""
    env = embedded_env()
    env["MODBOX_API_URL"] = base_url
    env["MODBOX_API_TOKEN"] = token
    return env


def env_for_kernel(
    request: pytest.FixtureRequest, kernel_name: str = KERNEL_NAME
) -> dict[str, str]:
    """Launch environment for ``kernel_name``: the shared service for modbox kernels.

    The ``local_service`` fixture (tests/conftest.py) is only requested when a modbox
    kernel is under test, so debugging against ``python3`` needs no service.
    """
    if not is_modbox(kernel_name):
        return embedded_env()
    service = request.getfixturevalue("local_service")
    return service_env(service.base_url, service.token)


# --------------------------------------------------------------------------- kernels


def start_kernel(
    kernel_name: str, env: Mapping[str, str], cwd: str | os.PathLike[str] | None = None
) -> tuple[KernelManager, BlockingKernelClient]:
    """Start an installed kernel and wait until it answers kernel_info."""
    kwargs: dict[str, Any] = {"env": dict(env)}
    if cwd is not None:
        kwargs["cwd"] = str(cwd)
    km, kc = start_new_kernel(kernel_name=kernel_name, startup_timeout=STARTUP_TIMEOUT, **kwargs)
    return km, kc


def stop_kernel(km: KernelManager, kc: BlockingKernelClient) -> None:
    kc.stop_channels()
    km.shutdown_kernel()


@dataclass
class CellRun:
    """Everything one execute_request produced, with arrival times (time.monotonic)."""

    msg_id: str
    sent_at: float
    reply: dict[str, Any] = field(default_factory=dict)
    reply_at: float = 0.0
    outputs: list[dict[str, Any]] = field(default_factory=list)
    output_times: list[float] = field(default_factory=list)

    def stream_text(self, name: str) -> str:
        return "".join(
            m["content"]["text"]
            for m in self.outputs
            if m["msg_type"] == "stream" and m["content"]["name"] == name
        )

    @property
    def stdout(self) -> str:
        return self.stream_text("stdout")

    @property
    def stderr(self) -> str:
        return self.stream_text("stderr")

    @property
    def status(self) -> str:
        return str(self.reply.get("content", {}).get("status"))

    def describe(self) -> str:
        """A compact account of the run, for assertion messages."""
        parts = [f"reply status={self.status}"]
        for m in self.outputs:
            content = m["content"]
            if m["msg_type"] == "stream":
                parts.append(f"{content['name']}: {content['text'][:300]!r}")
            elif m["msg_type"] == "error":
                parts.append(f"error: {content['ename']}: {content['evalue'][:300]}")
            else:
                parts.append(f"{m['msg_type']}: {sorted(content.get('data', {}))}")
        return "\n".join(parts)


def run_cell(kc: BlockingKernelClient, code: str, timeout: float = 60.0) -> CellRun:
    """Execute ``code`` and collect its outputs until both reply and idle have arrived.

    Both channels are polled in one loop (rather than reading IOPub to idle and then
    the reply) so that the recorded arrival time of every message is when it actually
    reached this process; the streaming test compares those times.
    """
    run = CellRun(msg_id=kc.execute(code, allow_stdin=False), sent_at=time.monotonic())
    deadline = run.sent_at + timeout
    idle = False
    while not (idle and run.reply):
        if time.monotonic() > deadline:
            raise TimeoutError(f"cell did not finish within {timeout} s; so far:\n{run.describe()}")
        got = False
        if not run.reply:
            try:
                reply = kc.get_shell_msg(timeout=0)
            except queue.Empty:
                pass
            else:
                got = True
                if reply["parent_header"].get("msg_id") == run.msg_id:
                    run.reply, run.reply_at = reply, time.monotonic()
        try:
            msg = kc.get_iopub_msg(timeout=0.005)
        except queue.Empty:
            msg = None
        if msg is not None:
            got = True
            if msg["parent_header"].get("msg_id") == run.msg_id:
                kind = msg["msg_type"]
                if kind == "status":
                    idle = idle or msg["content"]["execution_state"] == "idle"
                elif kind != "execute_input":
                    run.outputs.append(msg)
                    run.output_times.append(time.monotonic())
        if not got:
            time.sleep(0.002)
    return run


# --------------------------------------------------------------------------- notebooks


def read_notebook(path: str | os.PathLike[str]) -> nbformat.NotebookNode:
    return nbformat.read(str(path), as_version=4)


def execute_notebook(
    nb: nbformat.NotebookNode,
    kernel_name: str,
    env: Mapping[str, str],
    cwd: str | os.PathLike[str],
    timeout: int = 180,
) -> nbformat.NotebookNode:
    """Run every cell through nbclient (errors allowed) and return the executed copy."""
    nb = nbformat.from_dict(nb)  # deep copy: callers run the same notebook twice
    client = NotebookClient(
        nb,
        kernel_name=kernel_name,
        timeout=timeout,
        startup_timeout=STARTUP_TIMEOUT,
        allow_errors=True,
        resources={"metadata": {"path": str(cwd)}},
    )
    client.execute(env=dict(env))
    return nb


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
# warnings.showwarning prefixes "<filename>:<lineno>: <Category>: ". The filename a kernel
# compiles a cell under is its own business (ipykernel: /tmp/ipykernel_<pid>/<hash>.py),
# so only the filename is normalised; line number, category and message must match.
_WARNING_PREFIX = re.compile(r"^[^\n]*?:(\d+): (\w*Warning): ", re.MULTILINE)
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def terminal_text(text: str) -> str:
    """Render ``\\r`` and backspace per line the way a terminal would.

    Kernels may split a progress bar's writes into messages differently (ipykernel
    flushes every 0.2 s; a remote kernel coalesces per poll), and shell escapes run
    under a pty end lines with ``\\r\\n``; what a person sees is the same.
    """
    lines = []
    for raw_line in text.split("\n"):
        buf: list[str] = []
        col = 0
        for ch in raw_line:
            if ch == "\r":
                col = 0
            elif ch == "\b":
                col = max(col - 1, 0)
            else:
                if col < len(buf):
                    buf[col] = ch
                else:
                    buf.append(ch)
                col += 1
        lines.append("".join(buf))
    return "\n".join(lines)


def _normalise_value(mime: str, value: Any) -> Any:
    if mime.startswith("image/"):
        # Rendered pixels depend on font caches and the like; what must match is that
        # an image of that type was produced (and that a PNG really is one).
        if mime == "image/png":
            try:
                ok = base64.b64decode(value).startswith(_PNG_MAGIC)
            except (ValueError, TypeError):
                ok = False
            return "<png>" if ok else "<image/png that is not a PNG>"
        return f"<{mime}>"
    if mime == "text/plain" and isinstance(value, str):
        return _ADDRESS.sub(" at 0x…", value)
    return value


def normalise_outputs(outputs: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Reduce one cell's outputs to what a person sees.

    A contiguous run of stream outputs becomes one entry holding the concatenated text
    per stream name. The relative order of stdout and stderr inside such a run is not
    compared: they are two pipes, and even the local kernel's interleaving of them
    depends on flush timing. Errors compare by ename and evalue (traceback text holds
    file names and frames of the kernel's own machinery).
    """
    result: list[dict[str, Any]] = []
    streams: dict[str, str] = {}

    def flush_streams() -> None:
        if streams:
            merged = {}
            for name in sorted(streams):
                text = terminal_text(streams[name])
                if name == "stderr":
                    text = _WARNING_PREFIX.sub(r"<cell>:\1: \2: ", text)
                merged[name] = text
            result.append({"stream": merged})
            streams.clear()

    for out in outputs:
        kind = out["output_type"]
        if kind == "stream":
            streams[out["name"]] = streams.get(out["name"], "") + out["text"]
            continue
        flush_streams()
        if kind == "error":
            result.append({"error": [out["ename"], out["evalue"]]})
        else:
            entry: dict[str, Any] = {
                kind: {mime: _normalise_value(mime, v) for mime, v in out["data"].items()},
                "metadata": dict(out.get("metadata", {})),
            }
            if kind == "execute_result":
                entry["execution_count"] = out.get("execution_count")
            result.append(entry)
    flush_streams()
    return result


def normalise_notebook(nb: nbformat.NotebookNode) -> list[dict[str, Any]]:
    """One entry per code cell: its source head, execution count and normalised outputs."""
    return [
        {
            "cell": cell.source.splitlines()[0] if cell.source else "",
            "execution_count": cell.get("execution_count"),
            "outputs": normalise_outputs(cell.outputs),
        }
        for cell in nb.cells
        if cell.cell_type == "code"
    ]


def output_kinds(normalised: Iterable[Mapping[str, Any]]) -> set[str]:
    """The stream names, output types and mime types present in a normalised notebook."""
    kinds: set[str] = set()
    for cell in normalised:
        for out in cell["outputs"]:
            for key, value in out.items():
                if key == "stream":
                    kinds.update(value)
                elif key in ("display_data", "execute_result"):
                    kinds.add(key)
                    kinds.update(value)
                elif key == "error":
                    kinds.add("error")
    return kinds


# --------------------------------------------------------------------------- service and host


def list_sandboxes(base_url: str, token: str, status: str | None = None) -> list[dict[str, Any]]:
    """``GET /sandboxes`` on a Modbox(-compatible) control plane."""
    params = {"status": status} if status else None
    response = httpx.get(
        f"{base_url.rstrip('/')}/sandboxes",
        params=params,
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    response.raise_for_status()
    sandboxes: list[dict[str, Any]] = response.json()["sandboxes"]
    return sandboxes


def sandbox_processes(sandbox_ids: Iterable[str]) -> dict[str, list[int]]:
    """Host pids whose environment carries ``MODBOX_SANDBOX_ID=<id>`` for the given ids.

    The local service sets that variable in every sandbox, so it marks every process
    of a sandbox however deep in the tree, even inside a bwrap pid namespace.
    """
    wanted = {f"MODBOX_SANDBOX_ID={sid}".encode(): sid for sid in sandbox_ids}
    found: dict[str, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # exited meanwhile, or a kernel thread
            continue
        for var in environ.split(b"\0"):
            sid = wanted.get(var)
            if sid is not None:
                found.setdefault(sid, []).append(int(entry.name))
    return found


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.2) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
