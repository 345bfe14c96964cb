"""Usage accounting per owner on a real service with real cgroups.

One owner holds 300 MB in its sandbox, another spins the CPU for 2 s; the report
(``GET /usage`` and ``modbox-local usage``) must show each figure within 20 %, per
owner, both while the sandboxes live and after they are destroyed.
"""

from __future__ import annotations

import csv
import io
import secrets
import shlex
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from service_helpers import isolation_required, running_local_service

from modbox_kernel.local.owners import owner_token

pytestmark = pytest.mark.timeout(120)

SECRET = f"usage-{secrets.token_hex(12)}"
MB = 1000 * 1000
HOLD = "import time\nx = b'x' * (300 * 1000 * 1000)\ntime.sleep(0.5)\nprint(len(x))"
SPIN = "import time\nt = time.process_time()\nwhile time.process_time() - t < 2:\n    pass"


def _exec(base: str, token: str, code: str) -> None:
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60) as c:
        created = c.post("/sandboxes", json={}).json()
        assert c.post(f"/sandboxes/{created['sandbox_id']}/wait", json={}).json()["ready"]
    access = created["endpoint"]["access_token"]
    with httpx.Client(headers={"Authorization": f"Bearer {access}"}, timeout=60) as runtime:
        command = f"python3 -c {shlex.quote(code)}"
        done = runtime.post(created["capabilities"]["exec"], json={"command": command}).json()
        assert done["exitCode"] == 0, done


def _rows(base: str, token: str) -> dict[str, dict[str, object]]:
    answer = httpx.get(f"{base}/usage", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert answer.status_code == 200, answer.text
    return {row["owner"]: row for row in answer.json()["owners"]}


def _check(rows: dict[str, dict[str, object]]) -> None:
    holder, spinner = rows["holder"], rows["spinner"]
    peak = holder["peak_memory_bytes"]
    assert isinstance(peak, int) and 240 * MB <= peak <= 360 * MB, peak
    cpu = spinner["cpu_seconds"]
    assert isinstance(cpu, float) and 1.6 <= cpu <= 2.4, cpu
    assert holder["sandboxes"] == spinner["sandboxes"] == 1
    assert isinstance(holder["sandbox_seconds"], float) and holder["sandbox_seconds"] > 0


def test_the_usage_report_shows_each_owners_memory_and_cpu(tmp_path: Path) -> None:
    with running_local_service(tmp_path / "service.log", "--token", SECRET) as service:
        if "cgroup" not in service.log_text() or "memory" not in service.log_text():
            if isolation_required():
                pytest.fail("CI must account usage, but the service has no memory cgroup")
            pytest.skip("no writable memory cgroup here: usage is not accounted")
        holder, spinner = owner_token(SECRET, "holder"), owner_token(SECRET, "spinner")
        _exec(service.base_url, holder, HOLD)
        _exec(service.base_url, spinner, SPIN)
        live = _rows(service.base_url, SECRET)
        _check(live)
        # An owner sees only its own row.
        assert set(_rows(service.base_url, holder)) == {"holder"}
        # Destroyed sandboxes stay in the report, with the same figures.
        with service.client() as admin:
            for item in admin.get("/sandboxes", params={"status": "running"}).json()["sandboxes"]:
                admin.delete(f"/sandboxes/{item['id']}")
        settled = _rows(service.base_url, SECRET)
        _check(settled)
        # The CLI prints the same report as CSV.
        printed = subprocess.run(
            [sys.executable, "-m", "modbox_kernel.local", "usage", "--url", service.base_url,
             "--token", SECRET, "--csv"],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        table = {row["owner"]: row for row in csv.DictReader(io.StringIO(printed.stdout))}
        assert float(table["spinner"]["cpu_seconds"]) == pytest.approx(
            settled["spinner"]["cpu_seconds"]
        )
        assert SECRET not in printed.stdout + printed.stderr
