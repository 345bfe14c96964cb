"""The classroom recipe, for real: JupyterHub, five students, one shared service.

``examples/classroom/jupyterhub_config.py`` is loaded as a course would use it
(DummyAuthenticator, SimpleLocalProcessSpawner, configurable-http-proxy from npm, which
``.ci/run`` installs), with only what a test needs added on top: ports, a temporary
database, and an API service for the test. Five students log in through the hub's REST
API and start their servers; each opens ``lesson.ipynb`` in their home (beside a
``data.csv``) and runs cells on Modbox Python over the server's kernel websocket. Each
student's sandbox is invisible to every other student's credential, no student's
server holds the service's secret, and stopping the hub leaves no sandbox and no
process behind.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import nbformat
import psutil
import pytest
import websocket
from kernel_helpers import embedded_env
from lab_helpers import free_port
from service_helpers import LocalService, running_local_service, wait_until

from modbox_kernel.local.owners import owner_token

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "examples" / "classroom" / "jupyterhub_config.py"
STUDENTS = ["ada", "grace", "alan", "edsger", "barbara"]
SECRET = f"class-secret-{secrets.token_hex(16)}"


def require_proxy() -> str:
    found = shutil.which("configurable-http-proxy")
    if found:
        return found
    why = "configurable-http-proxy is missing (npm install -g configurable-http-proxy)"
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the hub test, but {why}")
    pytest.skip(why)


@dataclass
class Hub:
    url: str
    token: str
    process: subprocess.Popen[bytes]
    log: Path
    homes: Path

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"token {self.token}"}
        return httpx.request(method, f"{self.url}{path}", headers=headers, timeout=60, **kwargs)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[LocalService]:
    with running_local_service(tmp_path / "service.log", "--token", SECRET) as shared:
        yield shared


@pytest.fixture
def hub(tmp_path: Path, service: LocalService) -> Iterator[Hub]:
    require_proxy()
    homes = tmp_path / "homes"
    for name in STUDENTS:
        home = homes / name
        (home / ".ssh").mkdir(parents=True)
        (home / ".ssh" / "id_rsa").write_text("private\n")
        (home / "data.csv").write_text(f"student,score\n{name},{len(name)}\n")
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell("import pandas as pd\npd.read_csv('data.csv')")]
        nbformat.write(nb, str(home / "lesson.ipynb"))
    port, token = free_port(), secrets.token_hex(24)
    config = tmp_path / "test_config.py"
    config.write_text(
        f"c = get_config()  # noqa\n"
        f"load_subconfig({str(RECIPE)!r})  # noqa\n"
        f"c.JupyterHub.ip = '127.0.0.1'\n"
        f"c.JupyterHub.port = {port}\n"
        f"c.JupyterHub.hub_port = {free_port()}\n"
        f"c.ConfigurableHTTPProxy.api_url = 'http://127.0.0.1:{free_port()}'\n"
        f"c.ConfigurableHTTPProxy.pid_file = {str(tmp_path / 'proxy.pid')!r}\n"
        f"c.JupyterHub.db_url = 'sqlite:///{tmp_path / 'hub.sqlite'}'\n"
        f"c.JupyterHub.cookie_secret_file = {str(tmp_path / 'cookie_secret')!r}\n"
        f"c.JupyterHub.services = [{{'name': 'class-test', 'api_token': {token!r}}}]\n"
        "c.JupyterHub.load_roles = [{'name': 'class-test', 'services': ['class-test'],\n"
        "    'scopes': ['admin:users', 'admin:servers', 'access:servers', 'read:users']}]\n"
        "c.Spawner.args = [*c.Spawner.args, '--ServerApp.allow_root=True']\n"
        "c.Spawner.start_timeout = 120\n"
        "c.Spawner.http_timeout = 120\n"
    )
    env = {
        **embedded_env(),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "MODBOX_CLASS_SECRET": SECRET,
        "MODBOX_CLASS_SERVICE_URL": service.base_url,
        "MODBOX_CLASS_HOMES": str(homes),
    }
    log = tmp_path / "hub.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "jupyterhub", "-f", str(config)],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    running = Hub(f"http://127.0.0.1:{port}", token, process, log, homes)

    def up() -> bool:
        assert process.poll() is None, log.read_text()
        try:
            return running.api("GET", "/hub/api/").status_code == 200
        except httpx.HTTPError:
            return False

    try:
        assert wait_until(up, 90, 0.5), log.read_text()
        yield running
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()


def _start_server(hub: Hub, name: str) -> None:
    assert hub.api("POST", f"/hub/api/users/{name}").status_code in (201, 409)
    assert hub.api("POST", f"/hub/api/users/{name}/server").status_code in (201, 202)

    def ready() -> bool:
        servers = hub.api("GET", f"/hub/api/users/{name}").json().get("servers", {})
        return bool(servers.get("", {}).get("ready"))

    assert wait_until(ready, 120, 0.5), hub.log.read_text()[-3000:]


def _run_cells(hub: Hub, name: str, cells: list[str]) -> list[list[dict[str, Any]]]:
    """Open lesson.ipynb's kernel as JupyterLab would, run ``cells`` over the websocket."""
    base = f"{hub.url}/user/{name}"
    session = hub.api(
        "POST",
        f"/user/{name}/api/sessions",
        json={"path": "lesson.ipynb", "type": "notebook", "kernel": {"name": "modbox-python"}},
    )
    assert session.status_code == 201, session.text
    kernel_id = session.json()["kernel"]["id"]
    ws = websocket.create_connection(
        base.replace("http", "ws", 1) + f"/api/kernels/{kernel_id}/channels",
        header=[f"Authorization: token {hub.token}"],
        timeout=120,
    )
    results = []
    try:
        for code in cells:
            msg_id = uuid.uuid4().hex
            ws.send(
                json.dumps(
                    {
                        "header": {
                            "msg_id": msg_id,
                            "username": name,
                            "session": uuid.uuid4().hex,
                            "msg_type": "execute_request",
                            "version": "5.3",
                        },
                        "parent_header": {},
                        "metadata": {},
                        "content": {"code": code, "silent": False, "store_history": True,
                                    "user_expressions": {}, "allow_stdin": False},
                        "channel": "shell",
                        "buffers": [],
                    }
                )
            )  # fmt: skip
            outputs, replied, idle = [], False, False
            while not (replied and idle):
                msg = json.loads(ws.recv())
                if msg.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                kind = msg["msg_type"]
                if kind == "execute_reply":
                    replied = True
                    assert msg["content"]["status"] == "ok", msg["content"]
                elif kind == "status":
                    idle = msg["content"]["execution_state"] == "idle"
                elif kind in ("stream", "execute_result", "display_data", "error"):
                    outputs.append(msg)
            results.append(outputs)
    finally:
        ws.close()
    return results


def _running(service: LocalService, token: str) -> set[str]:
    with httpx.Client(
        base_url=service.base_url, headers={"Authorization": f"Bearer {token}"}, timeout=30
    ) as client:
        listed = client.get("/sandboxes", params={"status": "running"}).json()["sandboxes"]
    return {item["id"] for item in listed}


def test_five_students_on_a_hub_each_in_their_own_sandbox(hub: Hub, service: LocalService) -> None:
    with ThreadPoolExecutor(len(STUDENTS)) as pool:
        list(pool.map(lambda name: _start_server(hub, name), STUDENTS))
        cells = [
            "import pandas as pd\npd.read_csv('data.csv')",
            "import os\nprint(os.environ['MODBOX_SANDBOX_ID'])",
            # (uploads/ is where the sandbox's upload API puts files, not the home's.)
            "print(sorted(p for p in os.listdir('.') if p[0] != '.' and p != 'uploads'),"
            " os.path.exists('.ssh'))",
        ]
        ran = pool.map(lambda n: _run_cells(hub, n, cells), STUDENTS)
        runs = dict(zip(STUDENTS, ran, strict=True))
    sandboxes = {}
    for name, (table, sandbox, listing) in runs.items():
        # (Under load the first cell may show the "Starting a Modbox sandbox" line first.)
        (result,) = [m for m in table if m["msg_type"] == "execute_result"]
        html = result["content"]["data"]["text/html"]
        assert name in html and "score" in html  # the student's own data.csv, read
        sandboxes[name] = sandbox[0]["content"]["text"].strip()
        # The home came along (no notice), its hidden files did not.
        assert [m["content"]["text"] for m in listing] == ["['data.csv', 'lesson.ipynb'] False\n"]
        assert all(m["msg_type"] != "stream" or m["content"]["name"] != "stderr" for m in table)
    assert len(set(sandboxes.values())) == len(STUDENTS)
    for name in STUDENTS:  # each credential sees its owner's sandbox, and no one else's
        seen = _running(service, owner_token(SECRET, name))
        assert seen == {sandboxes[name]}, (name, seen)
    # No process the hub started (proxy, servers, kernels) holds the service's secret.
    tree = psutil.Process(hub.process.pid).children(recursive=True)
    holders = []
    for proc in tree:
        try:
            if SECRET in "\0".join(f"{k}={v}" for k, v in proc.environ().items()):
                holders.append(" ".join(proc.cmdline())[:200])
        except psutil.Error:
            continue
    assert holders == [], holders
    # Stopping the hub stops every server and kernel: no sandbox, no process left.
    hub.process.terminate()
    hub.process.wait(90)
    _, alive = psutil.wait_procs(tree, timeout=30)
    assert alive == [], [" ".join(p.cmdline()) for p in alive]
    assert wait_until(lambda: _running(service, SECRET) == set(), 60)
