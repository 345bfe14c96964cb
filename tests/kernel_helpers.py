"""Shared machinery for the end-to-end kernel tests.

Who calls what: ``tests/test_kernel_*.py``, ``tests/test_notebooks_*.py`` and
``tests/test_adversarial_kernel.py`` import this module (and tests/conftest.py, whose
``kernels`` fixture is a :class:`Kernels`). They build the environment a kernel is
launched with (:func:`service_env` to reuse the session's shared local Modbox service,
:func:`embedded_env` to make the kernel start its own, :func:`env_for_kernel` to pick
one for the kernel under test), start kernels through jupyter_client
(:func:`start_kernel`; a module's warmed-up kernels through the ``kernels`` fixture, or
one through :func:`running_kernel`), run cells while recording when each IOPub message
arrived (:func:`run_cell`; :func:`submit` and :func:`pump` for a cell
the test acts on while it runs), run whole notebooks through nbclient
(:func:`execute_notebook`) and reduce notebook outputs to a form in which
``modbox-python`` and the stock ``python3`` kernel must agree (:func:`normalise_notebook`).
The leak tests use :func:`list_sandboxes` and :func:`sandbox_processes`;
:func:`wait_until` is re-exported from tests/service_helpers.py.

``MODBOX_TEST_KERNEL`` (default ``modbox-python``) names the kernel under test. It exists
to debug these harnesses against the stock ``python3`` kernel; CI never sets it.
"""

from __future__ import annotations

import base64
import os
import queue
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import nbformat
import psutil
import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager, start_new_kernel
from nbclient import NotebookClient
from service_helpers import wait_until as wait_until  # re-exported for the kernel tests

KERNEL_NAME = os.environ.get("MODBOX_TEST_KERNEL", "modbox-python")
REFERENCE_KERNEL = "python3"
# The first cell of a modbox kernel waits for its sandbox; kernel_info must come at once,
# but a loaded 2-core CI machine can still be slow to launch the process itself.
STARTUP_TIMEOUT = 120
REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
_MODBOX_VARS = ("MODBOX_API_URL", "MODBOX_API_TOKEN", "MODBOX_BACKEND")
TEST_STATE_HOME = tempfile.mkdtemp(prefix="modbox-test-state-")
# Kernels started without a folder of their own run in a fresh empty one below this:
# Jupyter starts a kernel in the notebook's folder, and a modbox kernel copies that
# folder in and its cells' files back; the repository is no test's notebook folder.
KERNEL_FOLDERS = tempfile.mkdtemp(prefix="modbox-test-kernels-")


def is_modbox(kernel_name: str = KERNEL_NAME) -> bool:
    return kernel_name != REFERENCE_KERNEL


def only_modbox(why: str) -> pytest.MarkDecorator:
    """Skip when a debugging run (``MODBOX_TEST_KERNEL=python3``) tests the stock kernel.

    ``why`` says what the stock kernel lacks; CI never sets the variable, so these
    tests always run there.
    """
    return pytest.mark.skipif(not is_modbox(), reason=f"MODBOX_TEST_KERNEL={KERNEL_NAME}: {why}")


# --------------------------------------------------------------------------- environments


def embedded_env() -> dict[str, str]:
    """Environment in which a modbox kernel starts its own embedded local service.

    ``PYTEST_CURRENT_TEST`` is dropped too: ipykernel turns off its capture of fds 1
    and 2 when it sees that variable, and the reference kernel must behave as it does
    for users.
    """
    dropped = (*_MODBOX_VARS, "PYTEST_CURRENT_TEST")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    # Kernels record the sandboxes they make on shared services (modbox_kernel/records.py)
    # in the user's state directory: the tests' kernels use one of this test run's own.
    env["XDG_STATE_HOME"] = TEST_STATE_HOME
    return env


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
    if cwd is None:
        cwd = tempfile.mkdtemp(prefix=f"{kernel_name}-", dir=KERNEL_FOLDERS)
    kwargs: dict[str, Any] = {"env": dict(env), "cwd": str(cwd)}
    km, kc = start_new_kernel(kernel_name=kernel_name, startup_timeout=STARTUP_TIMEOUT, **kwargs)
    return km, kc


def stop_kernel(km: KernelManager, kc: BlockingKernelClient) -> None:
    kc.stop_channels()
    km.shutdown_kernel()


@dataclass
class Kernel:
    """A started kernel: its manager (interrupts, restarts, the pid) and its client."""

    km: KernelManager
    kc: BlockingKernelClient

    @property
    def process(self) -> psutil.Process:
        """The kernel process jupyter_client started (the floods test reads its RSS)."""
        pid = self.km.provisioner.pid  # type: ignore[union-attr]
        assert pid is not None
        return psutil.Process(pid)


@contextmanager
def running_kernel(
    kernel_name: str, env: Mapping[str, str], warm: str = "import time"
) -> Iterator[Kernel]:
    """A started kernel that has run ``warm``; stopped on exit.

    For module-scoped fixtures: the first cell waits for the sandbox, so it is run
    here, where its time counts against no test's figures.
    """
    km, kc = start_kernel(kernel_name, env)
    try:
        first = run_cell(kc, warm, timeout=STARTUP_TIMEOUT)
        assert first.status == "ok", first.describe()
        yield Kernel(km, kc)
    finally:
        stop_kernel(km, kc)


class Kernels:
    """Warmed-up kernels for one test module; :meth:`close` stops every one started.

    What the ``kernels`` fixture (tests/conftest.py, module scope) yields, so that a
    module's kernel fixture is one line: ``return kernels.start(env)``. Each kernel is
    a :func:`running_kernel`, entered on :meth:`start` and left (last started, first
    stopped) on :meth:`close`.
    """

    def __init__(self) -> None:
        self._stack = ExitStack()

    def start(
        self,
        env: Mapping[str, str],
        *,
        kernel_name: str = KERNEL_NAME,
        warm: str = "import time",
    ) -> Kernel:
        """Start ``kernel_name`` with ``env`` and run ``warm`` in it (as running_kernel)."""
        kernel: Kernel = self._stack.enter_context(running_kernel(kernel_name, env, warm))
        return kernel

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> Kernels:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@dataclass
class CellRun:
    """Everything one execute_request produced, with arrival times (time.monotonic)."""

    msg_id: str
    sent_at: float
    reply: dict[str, Any] = field(default_factory=dict)
    reply_at: float = 0.0
    outputs: list[dict[str, Any]] = field(default_factory=list)
    output_times: list[float] = field(default_factory=list)
    # True once IOPub said "idle" for this request: every output of it has been seen.
    idle: bool = False
    # The stdin channel's input_request messages, when pump() was asked to read them.
    input_requests: list[dict[str, Any]] = field(default_factory=list)

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

    @property
    def done(self) -> bool:
        """Reply and idle both arrived. Wait for this, not the reply alone, before the
        next request: after an error reply ipykernel aborts requests that reach it
        before it has finished the erroring one (stop_on_error), so a next cell sent
        on the reply alone can come back ``aborted``."""
        return self.idle and bool(self.reply)

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


def submit(kc: BlockingKernelClient, code: str, *, allow_stdin: bool | None = None) -> CellRun:
    """Send an execute_request and return at once; :func:`pump` collects what it produces.

    ``allow_stdin=None`` leaves jupyter_client's default (the client's ``allow_stdin``).
    """
    return CellRun(msg_id=kc.execute(code, allow_stdin=allow_stdin), sent_at=time.monotonic())


def pump(
    kc: BlockingKernelClient,
    run: CellRun,
    until: Callable[[], bool],
    timeout: float,
    *,
    stdin: bool = False,
) -> bool:
    """Collect ``run``'s messages until ``until()`` holds (True) or ``timeout`` s pass (False).

    The shell and IOPub channels (and, with ``stdin``, the stdin channel) are polled in
    one loop rather than one after the other, so that the recorded arrival time of
    every message is when it actually reached this process; the streaming, interrupt
    and flood tests compare those times. Messages of other requests are dropped.
    """
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            return False
        got = False
        if stdin and (request := _next(kc.get_stdin_msg)) is not None:
            got = True
            if request["parent_header"].get("msg_id") == run.msg_id:
                run.input_requests.append(request)
        if not run.reply and (reply := _next(kc.get_shell_msg)) is not None:
            got = True
            if reply["parent_header"].get("msg_id") == run.msg_id:
                run.reply, run.reply_at = reply, time.monotonic()
        # The only blocking read, and a short one: it paces the loop while idle.
        if (msg := _next(kc.get_iopub_msg, 0.005)) is not None:
            got = True
            if msg["parent_header"].get("msg_id") == run.msg_id:
                kind = msg["msg_type"]
                if kind == "status":
                    run.idle = run.idle or msg["content"]["execution_state"] == "idle"
                elif kind != "execute_input":
                    run.outputs.append(msg)
                    run.output_times.append(time.monotonic())
        if not got:
            time.sleep(0.002)
    return True


def _next(get: Callable[..., dict[str, Any]], timeout: float = 0) -> dict[str, Any] | None:
    """One message from a channel's ``get_*_msg``, or None when none came in ``timeout``."""
    try:
        return get(timeout=timeout)
    except queue.Empty:
        return None


def run_cell(kc: BlockingKernelClient, code: str, timeout: float = 60.0) -> CellRun:
    """Execute ``code`` (stdin not allowed) and collect until both reply and idle arrived."""
    run = submit(kc, code, allow_stdin=False)
    if not pump(kc, run, lambda: run.done, timeout):
        raise TimeoutError(f"cell did not finish within {timeout} s; so far:\n{run.describe()}")
    return run


def start_cell(kc: BlockingKernelClient, code: str, marker: str, timeout: float = 60) -> CellRun:
    """Send ``code`` and return once its stdout shows ``marker``.

    Tests that interrupt, flood or cut off a cell use it, so that the cell is really
    running in the sandbox (not still queued or provisioning) when they act.
    """
    run = submit(kc, code)
    started = pump(kc, run, lambda: marker in run.stdout, timeout)
    assert started, f"the cell did not print {marker!r} within {timeout} s:\n{run.describe()}"
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
