"""Authentication of the local service: control plane, runtime, health.

The control plane takes only the service token; a sandbox's runtime API takes only
that sandbox's access_token or its creator's SANDBOX_API_KEY. Refusals are 401 with
the Modbox envelope and never echo a token.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest
from service_helpers import LocalSandbox, LocalService, create_sandbox, destroy_sandbox

CONTROL_CALLS = [
    ("GET", "/sandboxes", None),
    ("POST", "/sandboxes", {}),
    ("POST", "/sandboxes/provision", {}),
    ("GET", "/sandboxes/{id}", None),
    ("DELETE", "/sandboxes/{id}", None),
    ("GET", "/sandboxes/{id}/status", None),
    ("POST", "/sandboxes/{id}/wait", {"timeout": 1}),
    ("POST", "/sandboxes/wait", {"task_id": "x"}),
    ("GET", "/sandboxes/status/x", None),
    ("POST", "/sandboxes/destroy", {"task_id": "x"}),
    ("GET", "/sandboxes/detail/{id}", None),
    ("GET", "/sandbox-images", None),
]


def assert_401(response: httpx.Response, code: str, *secrets: str) -> None:
    assert response.status_code == 401, response.text
    body = response.json()
    assert body["error"]["code"] == code
    assert body["detail"] == body["error"]["message"]
    assert body["error"]["request_id"] == response.headers["x-request-id"]
    assert response.headers["www-authenticate"].startswith("Bearer")
    for secret in secrets:
        assert secret not in response.text


@pytest.fixture(scope="module")
def keyed_sandbox(local_service: LocalService) -> Iterator[tuple[LocalSandbox, str]]:
    key = f"key-{uuid.uuid4().hex}"
    sandbox = create_sandbox(local_service, env_vars={"SANDBOX_API_KEY": key})
    try:
        yield sandbox, key
    finally:
        destroy_sandbox(sandbox)


def test_health_needs_no_token(local_service: LocalService) -> None:
    response = httpx.get(f"{local_service.base_url}/health")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"
    assert response.json()["isolation"] == local_service.isolation
    assert response.headers["x-request-id"]


@pytest.mark.parametrize(("method", "path", "body"), CONTROL_CALLS)
def test_control_plane_requires_the_service_token(
    local_service: LocalService,
    local_sandbox: LocalSandbox,
    method: str,
    path: str,
    body: dict[str, object] | None,
) -> None:
    url = local_service.base_url + path.format(id=local_sandbox.id)
    wrong = f"mbx_{uuid.uuid4().hex}"
    attempts = {
        "unauthenticated": {},
        "invalid_token": {"Authorization": f"Bearer {wrong}"},
    }
    for code, headers in attempts.items():
        response = httpx.request(method, url, json=body, headers=headers)
        assert_401(response, code, wrong)
    # A sandbox's runtime token is not a control-plane token.
    response = httpx.request(
        method, url, json=body, headers={"Authorization": f"Bearer {local_sandbox.access_token}"}
    )
    assert_401(response, "invalid_token", local_sandbox.access_token)
    # Basic auth carrying the right token is still not a bearer token.
    basic = httpx.request(method, url, json=body, auth=("user", local_service.token))
    assert_401(basic, "unauthenticated", local_service.token)


def test_runtime_accepts_only_its_own_credentials(
    local_service: LocalService,
    local_sandbox: LocalSandbox,
    keyed_sandbox: tuple[LocalSandbox, str],
) -> None:
    keyed, key = keyed_sandbox
    exec_url = keyed.exec_url
    files = keyed.files_url

    def call(token: str | None, what: str) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        if what == "exec":
            return httpx.post(exec_url, json={"command": "echo ok"}, headers=headers)
        if what == "list":
            return httpx.get(files, headers=headers)
        if what == "upload":
            return httpx.post(f"{files}/upload", files={"file": ("a.txt", b"a")}, headers=headers)
        if what == "download":
            return httpx.get(f"{files}/download", params={"path": "uploads/a.txt"}, headers=headers)
        return httpx.delete(files, params={"path": "uploads/none"}, headers=headers)

    for what in ("exec", "list", "upload", "download", "delete"):
        assert_401(call(None, what), "unauthenticated")
        # Another sandbox's token, the control-plane token, and a made-up one: refused.
        assert_401(call(local_sandbox.access_token, what), "invalid_token")
        assert_401(call(local_service.token, what), "invalid_token")
        assert_401(call(key + "x", what), "invalid_token", key)

    assert call(keyed.access_token, "exec").json()["stdout"] == "ok\n"
    assert call(key, "exec").json()["stdout"] == "ok\n"  # SANDBOX_API_KEY works too
    assert call(key, "upload").status_code == 200
    assert call(keyed.access_token, "download").content == b"a"


def test_one_sandboxes_key_does_not_open_another(
    local_sandbox: LocalSandbox, keyed_sandbox: tuple[LocalSandbox, str]
) -> None:
    _, key = keyed_sandbox
    response = httpx.post(
        local_sandbox.exec_url, json={"command": "true"}, headers={"Authorization": f"Bearer {key}"}
    )
    assert_401(response, "invalid_token", key)


def test_access_token_appears_only_in_the_create_answer(local_service: LocalService) -> None:
    with local_service.client() as control:
        created = control.post("/sandboxes", json={}).json()
        token = created["endpoint"]["access_token"]
        sid = created["sandbox_id"]
        control.post(f"/sandboxes/{sid}/wait", json={"timeout": 30})
        for path in (
            f"/sandboxes/{sid}",
            f"/sandboxes/detail/{sid}",
            "/sandboxes",
            f"/sandboxes/{sid}/status",
        ):
            assert token not in control.get(path).text
        control.delete(f"/sandboxes/{sid}")
    assert token not in local_service.log_text()
    assert local_service.token not in local_service.log_text()
