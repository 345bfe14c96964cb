"""Owners on a shared local service: one credential per student, each sees only its own.

A real service with a known secret (``--token``); owner credentials minted from it
(``modbox_kernel.local.owners.owner_token``, as a hub would). Owner A's credential must
not list, get, wait on, renew, destroy, upload to or exec in owner B's sandbox; a forged
or tampered credential is a 401 envelope; the per-owner cap is a 429 whose sentence
names it. A kernel with an owner credential works as with the service token.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from kernel_helpers import KERNEL_NAME, run_cell, service_env, start_kernel, stop_kernel
from service_helpers import LocalService, running_local_service

from modbox_kernel.local.owners import owner_token

SECRET = f"classroom-{secrets.token_hex(16)}"


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalService]:
    log = Path(tmp_path_factory.mktemp("owners")) / "service.log"
    with running_local_service(log, "--token", SECRET, "--max-sandboxes-per-owner", "2") as s:
        yield s


def _as(service: LocalService, token: str) -> httpx.Client:
    return httpx.Client(
        base_url=service.base_url, headers={"Authorization": f"Bearer {token}"}, timeout=60
    )


def _create(service: LocalService, token: str, **body: object) -> dict[str, Any]:
    with _as(service, token) as client:
        created = client.post("/sandboxes", json=body)
        assert created.status_code == 200, created.text
        answer: dict[str, Any] = created.json()
        waited = client.post(f"/sandboxes/{answer['sandbox_id']}/wait", json={"timeout": 60})
        assert waited.json()["ready"], waited.text
        return answer


def _not_found(response: httpx.Response) -> bool:
    return response.status_code == 404 and response.json()["error"]["code"] == "sandbox_not_found"


def test_an_owner_sees_and_touches_only_its_own_sandboxes(shared: LocalService) -> None:
    alice, bob = owner_token(SECRET, "alice"), owner_token(SECRET, "bob")
    a = _create(shared, alice, task_id="lesson-1")
    b = _create(shared, bob, task_id="lesson-1")  # the same task_id: names are per owner
    a_id, b_id = str(a["sandbox_id"]), str(b["sandbox_id"])
    with _as(shared, bob) as client:
        listed = {item["id"] for item in client.get("/sandboxes").json()["sandboxes"]}
        assert b_id in listed and a_id not in listed
        assert _not_found(client.get(f"/sandboxes/{a_id}"))
        assert _not_found(client.get(f"/sandboxes/detail/{a_id}"))
        assert _not_found(client.get(f"/sandboxes/{a_id}/status"))
        assert _not_found(client.post(f"/sandboxes/{a_id}/wait", json={"timeout": 1}))
        assert _not_found(client.post(f"/sandboxes/{a_id}/lease"))
        assert _not_found(client.delete(f"/sandboxes/{a_id}"))
        # By task_id (legacy routes), bob's name resolves to bob's own sandbox only.
        assert client.get("/sandboxes/status/lesson-1").json()["name"] == "lesson-1"
    with shared.client() as admin:  # the service token is the admin: it sees both
        everything = {item["id"] for item in admin.get("/sandboxes").json()["sandboxes"]}
        assert {a_id, b_id} <= everything
        assert admin.get(f"/sandboxes/{a_id}").json()["status"] == "running"  # not destroyed
    # The runtime API: neither bob's credential nor his sandbox's token opens alice's.
    exec_a = a["capabilities"]["exec"]  # type: ignore[index]
    files_a = a["capabilities"]["files"]  # type: ignore[index]
    b_token = b["endpoint"]["access_token"]  # type: ignore[index]
    for token in (bob, b_token):
        with httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
            assert http.post(exec_a, json={"command": "id"}).status_code == 401
            upload = http.post(f"{files_a.rstrip('/')}/upload", files={"file": ("x.txt", b"x")})
            assert upload.status_code == 401
    with httpx.Client(headers={"Authorization": f"Bearer {a['endpoint']['access_token']}"}) as http:  # type: ignore[index]
        assert http.post(exec_a, json={"command": "echo mine"}).json()["stdout"] == "mine\n"
    for token, sandbox_id in ((alice, a_id), (bob, b_id)):
        with _as(shared, token) as client:
            assert client.delete(f"/sandboxes/{sandbox_id}").status_code == 200


def test_forged_and_tampered_credentials_are_refused(shared: LocalService) -> None:
    alice, bob = owner_token(SECRET, "alice"), owner_token(SECRET, "bob")
    forged = [
        "mbo1:alice:" + bob.rsplit(":", 1)[1],  # alice's name, bob's signature
        alice[:-1] + ("A" if alice[-1] != "A" else "B"),  # one character changed
        alice.replace("mbo1:", "mbo2:"),
        owner_token("another-services-secret", "alice"),
        "mbo1:alice",
        "mbo1::" + alice.rsplit(":", 1)[1],
    ]
    for token in forged:
        with _as(shared, token) as client:
            answer = client.get("/sandboxes")
        assert answer.status_code == 401, (token, answer.text)
        error = answer.json()["error"]
        assert error["code"] == "invalid_token" and token not in answer.text


def test_the_per_owner_cap_is_a_429_that_names_it(shared: LocalService) -> None:
    carol = owner_token(SECRET, "carol")
    first, second = _create(shared, carol), _create(shared, carol)
    with _as(shared, carol) as client:
        third = client.post("/sandboxes", json={})
        assert third.status_code == 429, third.text
        error = third.json()["error"]
        assert error["message"] == (
            "carol already has 2 sandboxes running, the most one user may have at once (2)."
        )
        assert "--max-sandboxes-per-owner" in error["hint"]
        # Another owner is not held back by carol's cap.
        dave = owner_token(SECRET, "dave")
        with _as(shared, dave) as other:
            assert other.post("/sandboxes", json={}).status_code == 200
        for sandbox in (first, second):
            client.delete(f"/sandboxes/{sandbox['sandbox_id']}")


def test_an_idempotency_key_never_replays_another_owners_answer(shared: LocalService) -> None:
    alice, bob = owner_token(SECRET, "alice"), owner_token(SECRET, "bob")
    headers = {"Idempotency-Key": "same-key"}
    with _as(shared, alice) as a, _as(shared, bob) as b:
        first = a.post("/sandboxes", json={}, headers=headers).json()
        other = b.post("/sandboxes", json={}, headers=headers).json()
        assert other["sandbox_id"] != first["sandbox_id"]
        assert other["endpoint"]["access_token"] != first["endpoint"]["access_token"]
        a.delete(f"/sandboxes/{first['sandbox_id']}")
        b.delete(f"/sandboxes/{other['sandbox_id']}")


@pytest.mark.kernel
def test_a_kernel_with_an_owner_credential_runs_cells(shared: LocalService) -> None:
    env = service_env(shared.base_url, owner_token(SECRET, "erin"))
    km, kc = start_kernel(KERNEL_NAME, env)
    try:
        run = run_cell(kc, "import os\nprint(os.environ['MODBOX_SANDBOX_ID'])")
        assert run.status == "ok", run.describe()
        with shared.client() as admin:
            sandbox = admin.get(f"/sandboxes/{run.stdout.strip()}").json()
        assert sandbox["status"] == "running"
    finally:
        stop_kernel(km, kc)


# --------------------------------------------------------------------------- roles

ROLE_SECRET = f"roles-{secrets.token_hex(16)}"


@pytest.fixture(scope="module")
def with_roles(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalService]:
    log = Path(tmp_path_factory.mktemp("roles")) / "service.log"
    args = ("--token", ROLE_SECRET, "--role", "assistant:memory=256,sandboxes=1")
    with running_local_service(log, *args) as s:
        yield s


def _exec(created: dict[str, Any], command: str) -> httpx.Response:
    """An exec in a sandbox ``_create`` made, with its own runtime credential."""
    endpoint, capabilities = created["endpoint"], created["capabilities"]
    assert isinstance(endpoint, dict) and isinstance(capabilities, dict)
    token = endpoint["access_token"]
    with httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=60) as runtime:
        return runtime.post(capabilities["exec"], json={"command": command})


def test_a_role_has_its_own_memory_limit_and_cap(with_roles: LocalService) -> None:
    health = httpx.get(f"{with_roles.base_url}/health").json()
    if "memory" not in health["limits"]:
        pytest.skip(f"no writable memory cgroup on this host ({health['limits']})")
    assistant = owner_token(ROLE_SECRET, "dana", "assistant")
    student = owner_token(ROLE_SECRET, "erin")
    mine = _create(with_roles, assistant)
    theirs = _create(with_roles, student)
    limit = _exec(mine, 'echo "$MODBOX_MEMORY_LIMIT"')
    assert limit.json()["stdout"].strip() == str(256 << 20), limit.text
    hog = "python3 -c 'b = bytearray(400 << 20); b[::4096] = bytes(len(b[::4096]))'"
    # The student's sandbox keeps the service's 2 GiB; the assistant's 256 MiB stops it.
    assert _exec(theirs, hog).json()["exitCode"] == 0
    killed = _exec(mine, hog)
    assert killed.status_code == 404 and "out of memory (limit 256 MiB)" in killed.text, killed.text
    # The role's cap: one live sandbox (the killed one is gone).
    _create(with_roles, assistant)
    with _as(with_roles, assistant) as client:
        refused = client.post("/sandboxes", json={})
    assert refused.status_code == 429, refused.text
    message = refused.json()["error"]["message"] + refused.json()["error"]["hint"]
    assert "one assistant" in message and "--role assistant:sandboxes=N" in message


def test_a_role_is_under_the_signature_and_must_exist(with_roles: LocalService) -> None:
    signed = owner_token(ROLE_SECRET, "fay", "assistant")
    promoted = signed.replace("+assistant:", "+ghost:")
    with _as(with_roles, promoted) as client:
        assert client.get("/sandboxes").status_code == 401
    unknown = owner_token(ROLE_SECRET, "fay", "ghost")  # correctly signed, no such role
    with _as(with_roles, unknown) as client:
        refused = client.post("/sandboxes", json={})
        assert client.get("/sandboxes").status_code == 200  # who it is stays valid
    assert refused.status_code == 403, refused.text
    assert "'ghost'" in refused.json()["error"]["message"]
    # One owner, with or without the role: the same sandboxes.
    plain = owner_token(ROLE_SECRET, "fay")
    made = str(_create(with_roles, plain)["sandbox_id"])
    with _as(with_roles, signed) as client:
        assert made in {s["id"] for s in client.get("/sandboxes").json()["sandboxes"]}
