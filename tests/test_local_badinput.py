"""Bad input gets an envelope (422 / 404 / 405 / 413), never a 500 or a dead service.

All against the real service, except the last test: an *unexpected* exception inside
a route is a fault the real server cannot be made to produce on demand, so it drives
the app in-process with a registry that raises.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from service_helpers import LocalSandbox, LocalService, wait_until

MIB = 1024 * 1024


def assert_envelope(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    error = body["error"]
    assert error["message"] and body["detail"] == error["message"]
    assert error["request_id"] == response.headers["x-request-id"]
    assert "Traceback" not in response.text
    if code is not None:
        assert error["code"] == code, body
    return error


@pytest.fixture(scope="module")
def control(local_service: LocalService) -> Iterator[httpx.Client]:
    with local_service.client() as client:
        yield client


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"ttl_seconds": "soon"}, "body.ttl_seconds"),
        ({"ttl_seconds": 59}, "body.ttl_seconds"),
        ({"ttl_seconds": 86401}, "body.ttl_seconds"),
        ({"ttl_seconds": True}, "body.ttl_seconds"),
        ({"ttl_seconds": 100.5}, "body.ttl_seconds"),
        ({"task_id": 42}, "body.task_id"),
        ({"task_id": ""}, "body.task_id"),
        ({"task_id": "x" * 256}, "body.task_id"),
        ({"env_vars": ["A=1"]}, "body.env_vars"),
        ({"env_vars": {"1BAD": "x"}}, "body.env_vars.1BAD"),
        ({"env_vars": {"A": 1}}, "body.env_vars.A"),
        ({"env_vars": {"MODBOX_SANDBOX_ID": "spoof"}}, "body.env_vars.MODBOX_SANDBOX_ID"),
        ({"fast_start": "yes"}, "body.fast_start"),
        ({"image": 7}, "body.image"),
    ],
)
def test_create_rejects_wrong_types_and_ranges(
    control: httpx.Client, body: dict, field: str
) -> None:
    error = assert_envelope(control.post("/sandboxes", json=body), 422, "validation_error")
    assert error["details"][0]["field"] == field


@pytest.mark.parametrize(
    "raw",
    [b"{", b"[1, 2]", b'"text"', b"\xff\xfe", b'{"task_id": "a"} trailing'],
)
def test_malformed_json_is_422(control: httpx.Client, raw: bytes) -> None:
    headers = {"Content-Type": "application/json"}
    for path in ("/sandboxes", "/sandboxes/provision", "/sandboxes/wait", "/sandboxes/destroy"):
        assert_envelope(control.post(path, content=raw, headers=headers), 422, "validation_error")


def test_wait_and_list_validation(control: httpx.Client, local_sandbox: LocalSandbox) -> None:
    wait = f"/sandboxes/{local_sandbox.id}/wait"
    assert_envelope(control.post(wait, json={"timeout": 601}), 422, "validation_error")
    assert_envelope(control.post(wait, json={"timeout": "x"}), 422, "validation_error")
    assert_envelope(control.post(wait, json={"poll_interval": 0}), 422, "validation_error")
    assert_envelope(control.post("/sandboxes/wait", json={}), 422, "validation_error")
    assert_envelope(control.post("/sandboxes/destroy", json={"task_id": 5}), 422)
    assert_envelope(control.get("/sandboxes", params={"status": "bogus"}), 422)


def test_unknown_ids_and_routes(control: httpx.Client, local_sandbox: LocalSandbox) -> None:
    missing = str(uuid.uuid4())
    for method, path in (
        ("GET", f"/sandboxes/{missing}"),
        ("DELETE", f"/sandboxes/{missing}"),
        ("GET", f"/sandboxes/{missing}/status"),
        ("POST", f"/sandboxes/{missing}/wait"),
        ("GET", f"/sandboxes/detail/{missing}"),
        ("GET", "/sandboxes/status/no-such-name"),
    ):
        assert_envelope(control.request(method, path, json={}), 404, "sandbox_not_found")
    runtime = local_sandbox.exec_url.replace(local_sandbox.id, missing)
    assert_envelope(
        httpx.post(runtime, json={"command": "true"}, headers=control.headers),
        404,
        "sandbox_not_found",
    )
    assert_envelope(control.get("/no/such/route"), 404, "not_found")
    assert_envelope(control.put("/sandboxes"), 405)
    assert_envelope(control.get(f"/sandbox-images/{missing}"), 404, "image_not_found")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "body.command"),
        ({"command": 5}, "body.command"),
        ({"command": None}, "body.command"),
        ({"command": "a\0b"}, "body.command"),
        ({"command": "true", "timeout": 0}, "body.timeout"),
        ({"command": "true", "timeout": -1}, "body.timeout"),
        ({"command": "true", "timeout": "1"}, "body.timeout"),
        ({"command": "true", "timeout": 10**9}, "body.timeout"),
    ],
)
def test_exec_validation(local_sandbox: LocalSandbox, body: dict, field: str) -> None:
    error = assert_envelope(
        local_sandbox.http.post(local_sandbox.exec_url, json=body), 422, "validation_error"
    )
    assert error["details"][0]["field"] == field


def test_file_routes_validation(local_sandbox: LocalSandbox) -> None:
    http, files = local_sandbox.http, local_sandbox.files_url
    assert_envelope(http.post(f"{files}/upload", json={"file": "x"}), 422, "validation_error")
    no_file = http.post(f"{files}/upload", files={"other": ("a", b"a")})
    assert_envelope(no_file, 422, "validation_error")
    no_name = http.post(f"{files}/upload", files={"file": ("", b"a")})
    assert no_name.status_code in (400, 422), no_name.text
    assert_envelope(http.get(f"{files}/download"), 422, "validation_error")
    assert_envelope(http.get(f"{files}/download", params={"path": "a\0b"}), 422)
    assert_envelope(http.delete(files), 422, "validation_error")
    assert_envelope(http.delete(files, params={"path": "/"}), 403, "forbidden")
    assert_envelope(http.get(f"{files}/download", params={"path": "uploads"}), 409)


def test_oversized_bodies_are_413(control: httpx.Client, local_sandbox: LocalSandbox) -> None:
    big_json = json.dumps({"task_id": "x", "pad": "y" * (2 * MIB)})
    assert_envelope(
        control.post("/sandboxes", content=big_json, headers={"Content-Type": "application/json"}),
        413,
    )

    # No Content-Length (chunked): the limit holds while reading.
    def chunks() -> Iterator[bytes]:
        yield b'{"command": "'
        for _ in range(20):
            yield b"x" * MIB
        yield b'"}'

    assert_envelope(local_sandbox.http.post(local_sandbox.exec_url, content=chunks()), 413)
    too_big = b"\0" * (50 * 1000 * 1000 + 1)
    response = local_sandbox.http.post(
        f"{local_sandbox.files_url}/upload", files={"file": ("big.bin", too_big)}
    )
    assert_envelope(response, 413)
    listing = local_sandbox.http.get(local_sandbox.files_url, params={"path": "uploads"})
    assert "big.bin" not in {e["name"] for e in listing.json()["entries"]}


def _abandon(url: str, token: str, content_type: str, first_bytes: bytes) -> None:
    """POST ``url`` declaring a 1 MiB body, send only ``first_bytes``, then hang up."""
    parts = urlsplit(url)
    head = (
        f"POST {parts.path} HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {MIB}\r\n\r\n"
    )
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(head.encode() + first_bytes)


@pytest.mark.parametrize("route", ["upload", "exec"])
def test_a_client_that_hangs_up_mid_body_is_one_log_line(
    local_service: LocalService, local_sandbox: LocalSandbox, route: str
) -> None:
    # A kernel shutting down can close an upload or a poll half-sent; the service must
    # note it and go on, not log a crash (test_service_still_answers_after_all_that
    # checks the whole log for tracebacks).
    if route == "upload":
        url, boundary = f"{local_sandbox.files_url}/upload", "b0undary"
        first = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="half.bin"\r\nContent-Type: application/octet-stream\r\n\r\n'
        ).encode() + b"x" * 4096
        content_type = f"multipart/form-data; boundary={boundary}"
    else:
        url, first, content_type = local_sandbox.exec_url, b'{"command": "', "application/json"
    before = local_service.log_text().count("before its body was read")
    _abandon(url, local_sandbox.access_token, content_type, first)
    assert wait_until(
        lambda: local_service.log_text().count("before its body was read") > before, 10
    ), local_service.log_text()[-3000:]
    assert "Traceback" not in local_service.log_text()
    listing = local_sandbox.http.get(local_sandbox.files_url, params={"path": "uploads"})
    assert "half.bin" not in {e["name"] for e in listing.json().get("entries", [])}


def test_a_download_abandoned_midway_leaves_no_fd_open(
    local_service: LocalService, local_sandbox: LocalSandbox
) -> None:
    # The stream stops at the hang-up without reaching the file's end; the service
    # must still close the file (else one fd per abandoned download, until EMFILE).
    assert local_sandbox.exec("head -c 20000000 /dev/zero > abandoned.bin")["exitCode"] == 0

    def open_fds() -> int:
        return len(os.listdir(f"/proc/{local_service.pid}/fd"))

    before = open_fds()
    parts = urlsplit(local_sandbox.files_url)
    for _ in range(5):
        with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
            sock.sendall(
                f"GET {parts.path}/download?path=abandoned.bin HTTP/1.1\r\n"
                f"Host: {parts.hostname}:{parts.port}\r\n"
                f"Authorization: Bearer {local_sandbox.access_token}\r\n\r\n".encode()
            )
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    assert wait_until(lambda: open_fds() <= before, 10), (before, open_fds())
    whole = local_sandbox.http.get(
        f"{local_sandbox.files_url}/download", params={"path": "abandoned.bin"}
    )
    assert whole.status_code == 200 and len(whole.content) == 20_000_000
    assert wait_until(lambda: open_fds() <= before, 10), (before, open_fds())


def test_service_still_answers_after_all_that(
    local_service: LocalService, local_sandbox: LocalSandbox
) -> None:
    assert httpx.get(f"{local_service.base_url}/health").json()["status"] == "ok"
    assert local_sandbox.exec("echo alive")["stdout"] == "alive\n"
    assert local_service.process.poll() is None
    assert "Traceback" not in local_service.log_text()


async def test_unexpected_exception_is_a_500_envelope_without_trace(tmp_path: Path) -> None:
    from modbox_kernel.local.app import build_app
    from modbox_kernel.local.cgroups import CgroupManager
    from modbox_kernel.local.config import ServiceConfig
    from modbox_kernel.local.jail import Jail
    from modbox_kernel.local.registry import Registry
    from modbox_kernel.local.shapes import builtin_image
    from modbox_kernel.local.state import ServiceState

    class BrokenRegistry(Registry):
        def list(self, status: str | None = None, owner: str | None = None) -> list:
            raise RuntimeError("secret internal detail")

    config = ServiceConfig("127.0.0.1", 0, "tok", tmp_path, "none", False, False)
    state = ServiceState(
        config=config,
        registry=BrokenRegistry(config, Jail(), CgroupManager("none", None, None, 0, 0)),
        isolation="none",
        limits_note="test",
        image=builtin_image(datetime.now(timezone.utc)),
        base_url="http://testserver",
    )
    transport = httpx.ASGITransport(app=build_app(state), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        response = await client.get("/sandboxes", headers={"Authorization": "Bearer tok"})
        error = assert_envelope(response, 500, "internal_error")
        assert "secret internal detail" not in response.text
        assert "RuntimeError" in error["message"]
        assert (await client.get("/health")).status_code == 200
