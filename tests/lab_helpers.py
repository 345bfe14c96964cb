"""A real JupyterLab server and a real Chromium for the frontend tests.

``test_frontend_lab.py`` starts one :class:`LabServer` per module (``jupyter lab`` on
127.0.0.1, a random port and token, its root a temporary folder) and drives it with
Playwright through Debian's Chromium (``/usr/bin/chromium``: Playwright's own browser
download cannot work on these machines). :class:`Notebook` wraps what a person does in
a notebook: click into the last cell, type or paste, Shift+Enter, read what the page
shows. Nothing here talks to a kernel directly; the REST API is used only to find and
stop what a test left running.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
from service_helpers import wait_until

#: Debian's Chromium (``apt-get install -y chromium``; ``.ci/run`` installs it).
CHROMIUM = "/usr/bin/chromium"
#: Flags for a headless Chromium on a machine with no network but loopback.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
MODBOX = "Modbox Python"
PYTHON3 = "Python 3 (ipykernel)"
START_TIMEOUT_S = 60.0


def browser_required() -> bool:
    """CI sets MODBOX_REQUIRE_BROWSER=1: a missing browser fails instead of skipping."""
    return os.environ.get("MODBOX_REQUIRE_BROWSER", "").strip().lower() in ("1", "true", "yes")


def require_chromium() -> str:
    """The Chromium binary, or a skip (a failure under MODBOX_REQUIRE_BROWSER=1)."""
    if os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    why = f"{CHROMIUM} is missing (apt-get install -y chromium)"
    if browser_required():
        pytest.fail(f"MODBOX_REQUIRE_BROWSER=1 but {why}")
    pytest.skip(f"{why}; set MODBOX_REQUIRE_BROWSER=1 to make this a failure")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LabServer:
    """A running ``jupyter lab`` and how to reach it."""

    port: int
    token: str
    root: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    workspaces: int = field(default=0)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fresh_url(self) -> str:
        """A new, empty workspace (nothing restored from an earlier page)."""
        self.workspaces += 1
        return f"{self.base}/lab/workspaces/w{self.workspaces}?reset&token={self.token}"

    def api(self, path: str, method: str = "GET") -> Any:
        request = urllib.request.Request(
            f"{self.base}{path}", method=method, headers={"Authorization": f"token {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
        return json.loads(body) if body else None

    def kernels(self) -> list[dict[str, Any]]:
        kernels: list[dict[str, Any]] = self.api("/api/kernels")
        return kernels

    def shut_down_kernels(self) -> None:
        for kernel in self.kernels():
            self.api(f"/api/kernels/{kernel['id']}", method="DELETE")

    def kernel_process(self, kernel_id: str) -> psutil.Process:
        """The kernel's process: a child of the server started with its connection file."""
        for child in psutil.Process(self.process.pid).children(recursive=True):
            try:
                if any(f"kernel-{kernel_id}.json" in arg for arg in child.cmdline()):
                    return child
            except psutil.Error:
                continue
        raise AssertionError(f"no process for kernel {kernel_id}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_lab(root: Path, state: Path, env: dict[str, str]) -> LabServer:
    """Start JupyterLab serving ``root``; its settings, workspaces and runtime in ``state``."""
    port, token = free_port(), secrets.token_hex(16)
    settings = state / "settings"
    # No "would you like news?" toast and no update check: nothing here may reach out.
    notification = settings / "@jupyterlab" / "apputils-extension"
    notification.mkdir(parents=True, exist_ok=True)
    (notification / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False})
    )
    env = {**env, "JUPYTER_RUNTIME_DIR": str(state / "runtime")}
    log_path = state / "lab.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "jupyter", "lab", "--no-browser",
                "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
                "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
                f"--ServerApp.root_dir={root}", "--ServerApp.allow_root=True",
                f"--LabApp.user_settings_dir={settings}",
                f"--LabApp.workspaces_dir={state / 'workspaces'}",
                "--LabApp.extension_manager=readonly",
                "--LabApp.news_url=",
                "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=root,
        )  # fmt: skip
    server = LabServer(port=port, token=token, root=root, process=process, log_path=log_path)

    def up() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"jupyter lab exited:\n{server.log_text()}")
        try:
            server.api("/api/status")
        except OSError:
            return False
        return True

    if not wait_until(up, START_TIMEOUT_S):
        stop_lab(server)
        raise RuntimeError(f"jupyter lab did not answer:\n{server.log_text()}")
    return server


def stop_lab(server: LabServer) -> list[str]:
    """Stop the server (it shuts its kernels down); returns processes it left behind."""
    try:
        descendants = psutil.Process(server.process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    server.process.terminate()
    try:
        server.process.wait(30)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
    _, alive = psutil.wait_procs(descendants, timeout=15)
    left = []
    for proc in alive:
        try:
            left.append(" ".join(proc.cmdline()) or str(proc.pid))
            proc.kill()
        except psutil.Error:
            continue
    return left


class Notebook:
    """One open notebook in a page, driven as a person would."""

    def __init__(self, page: Any) -> None:
        self.page = page

    @property
    def cells(self) -> Any:
        return self.page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell")

    def cell(self, index: int) -> Any:
        return self.cells.nth(index)

    def wait_idle(self, kernel: str = MODBOX, timeout: float = START_TIMEOUT_S) -> None:
        """The status bar says the kernel is idle (after start, restart, a cell)."""
        status = self.page.locator(".jp-StatusBar-Widget", has_text=f"{kernel} | Idle")
        status.first.wait_for(timeout=timeout * 1000)

    def type_into_last_cell(self, code: str, *, paste: bool = False) -> Any:
        """Click into the (empty) last cell and enter ``code``; returns that cell."""
        cell = self.cells.last
        cell.locator(".cm-content").click()
        if paste:
            # Pasted text keeps its own indentation (typing would auto-indent again).
            self.page.keyboard.insert_text(code)
        else:
            self.page.keyboard.type(code)
        return cell

    def run(self, code: str, *, paste: bool = False, wait: bool = True, timeout: float = 60) -> Any:
        """Enter ``code`` in the last cell and Shift+Enter; wait until it has finished."""
        index = self.cells.count() - 1
        self.type_into_last_cell(code, paste=paste)
        self.page.keyboard.press("Shift+Enter")
        cell = self.cell(index)
        if wait:
            self.wait_finished(cell, timeout)
        return cell

    def wait_finished(self, cell: Any, timeout: float = 60) -> None:
        """The cell's prompt shows its execution count (``[n]:``, not ``[*]:``)."""
        prompt = cell.locator(".jp-InputArea-prompt")
        deadline = time.monotonic() + timeout
        while not re.fullmatch(r"\[\d+\]:", prompt.inner_text().strip()):
            assert time.monotonic() < deadline, f"the cell did not finish: {prompt.inner_text()}"
            self.page.wait_for_timeout(50)

    @staticmethod
    def output_text(cell: Any) -> str:
        outputs = cell.locator(".jp-OutputArea-output")
        return "\n".join(outputs.nth(i).inner_text() for i in range(outputs.count()))

    def toolbar_button(self, command: str) -> Any:
        return self.page.locator(f".jp-NotebookPanel-toolbar [data-command='{command}']")


def open_notebook(page: Any, server: LabServer, kernel: str = MODBOX) -> Notebook:
    """Load a fresh workspace and click the kernel's Notebook tile in the Launcher."""
    page.goto(server.fresh_url())
    tile = page.locator(f".jp-LauncherCard[data-category='Notebook'][title='{kernel}']")
    tile.click(timeout=START_TIMEOUT_S * 1000)
    notebook = Notebook(page)
    notebook.cells.first.wait_for(timeout=START_TIMEOUT_S * 1000)
    notebook.wait_idle(kernel)
    return notebook


def save_artifacts(folder: Path, page: Any, console: list[str]) -> None:
    """A failing test's screenshot and browser console, for whoever reads the report."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    try:
        page.screenshot(path=str(folder / "page.png"), full_page=True)
    except Exception as exc:  # the page may be gone: keep the console anyway
        (folder / "screenshot-error.txt").write_text(repr(exc))
    (folder / "console.txt").write_text("\n".join(console) + "\n")
