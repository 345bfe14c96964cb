"""Fault shapes for the API client that a real server cannot produce on demand.

httpx.MockTransport stands in for Modbox here (and only here): 429 with Retry-After,
a run of 503s, a connection reset mid-exec, a legacy FastAPI 422 body. The happy
paths run against the real local service in test_api_client.py.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable
from email.utils import formatdate

import httpx
import pytest

from modbox_kernel.api import ModboxClient, SandboxInfo, destroy_sandbox_blocking
from modbox_kernel.api.retry import RetryMode, RetryPolicy, parse_retry_after
from modbox_kernel.errors import (
    AuthenticationError,
    ConfigurationError,
    ModboxTimeoutError,
    ProvisioningError,
    ServerError,
    ServiceUnreachableError,
    ValidationError,
)

TOKEN = "mbx_control_SECRET_0123456789abcdef"
ACCESS = "sbx_access_SECRET_fedcba9876543210"
API_KEY = "key_runtime_SECRET_5555aaaa"
SECRETS = (TOKEN, ACCESS, API_KEY)
BASE = "https://modbox.test"

Handler = Callable[[httpx.Request], httpx.Response]


class Recorder:
    """A MockTransport handler that records every request and replays scripted answers."""

    def __init__(self, *answers: httpx.Response | Exception | Handler) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        if callable(answer):
            return answer(request)
        return answer

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)


def envelope(status: int, code: str, message: str, **headers: str) -> httpx.Response:
    body = {"error": {"code": code, "message": message, "request_id": "req-1"}, "detail": message}
    return httpx.Response(status, json=body, headers=headers)


def provisioned(sandbox_id: str = "sb-1") -> httpx.Response:
    return httpx.Response(
        200,
        json={
            "success": True,
            "sandbox_id": sandbox_id,
            "status": "provisioning",
            "sandbox_url": None,
            "endpoint": {
                "api_url": f"https://{sandbox_id}.sandbox.test/modbox/api",
                "base_url": f"https://{sandbox_id}.sandbox.test",
                "access_token": ACCESS,
            },
            "capabilities": {
                "exec": f"https://{sandbox_id}.sandbox.test/cap/exec",
                "files": f"https://{sandbox_id}.sandbox.test/cap/files/",
            },
        },
    )


def running_info(**overrides: object) -> SandboxInfo:
    fields: dict[str, object] = {
        "id": "sb-1",
        "status": "running",
        "sandbox_url": "https://sb-1.sandbox.test",
        "access_token": ACCESS,
    }
    fields.update(overrides)
    return SandboxInfo(**fields)  # type: ignore[arg-type]


def exec_ok(stdout: str = "hi\n") -> httpx.Response:
    return httpx.Response(
        200, json={"exitCode": 0, "stdout": stdout, "stderr": "", "durationMs": 3}
    )


def client_for(recorder: Recorder, **kwargs: object) -> ModboxClient:
    kwargs.setdefault("token", TOKEN)
    return ModboxClient(BASE, transport=recorder.transport, **kwargs)  # type: ignore[arg-type]


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text


# --- control plane: retries ----------------------------------------------------------


async def test_429_waits_for_retry_after_and_reuses_the_idempotency_key() -> None:
    rec = Recorder(
        envelope(429, "rate_limited", "slow down", **{"Retry-After": "1"}), provisioned()
    )
    async with client_for(rec) as client:
        started = time.monotonic()
        info = await client.create_sandbox(task_id="t1", ttl_seconds=600)
        elapsed = time.monotonic() - started

    assert elapsed >= 1.0
    assert len(rec.requests) == 2
    keys = [r.headers["Idempotency-Key"] for r in rec.requests]
    assert keys[0] and keys[0] == keys[1]
    assert [json.loads(r.content) for r in rec.requests] == [
        {"task_id": "t1", "ttl_seconds": 600}
    ] * 2
    assert info.id == "sb-1"
    assert info.status == "provisioning"
    assert info.name == "t1"
    assert info.access_token == ACCESS


async def test_caller_idempotency_key_is_sent_as_given() -> None:
    rec = Recorder(envelope(502, "upstream_error", "bad gateway"), provisioned())
    async with client_for(rec) as client:
        await client.create_sandbox(idempotency_key="my-key-1")
    assert [r.headers["Idempotency-Key"] for r in rec.requests] == ["my-key-1", "my-key-1"]
    assert json.loads(rec.requests[0].content) == {}


async def test_repeated_503_ends_in_one_server_error_after_max_attempts() -> None:
    rec = Recorder(envelope(503, "internal_error", "overloaded"))
    async with client_for(rec, max_attempts=3) as client:
        with pytest.raises(ServerError) as caught:
            await client.get_sandbox("sb-1")
    assert len(rec.requests) == 3
    assert caught.value.status_code == 503
    assert "HTTP 503" in str(caught.value)
    assert "after 3 attempts" in str(caught.value)


async def test_5xx_marked_not_retryable_is_not_retried() -> None:
    body = {"error": {"code": "provisioning_failed", "message": "image broken", "retryable": False}}
    rec = Recorder(httpx.Response(500, json=body), provisioned())
    async with client_for(rec) as client:
        with pytest.raises(ServerError, match="image broken"):
            await client.create_sandbox()
    assert len(rec.requests) == 1


async def test_401_is_not_retried_and_names_the_token_setting() -> None:
    rec = Recorder(envelope(401, "invalid_token", "token not recognised"))
    async with client_for(rec) as client:
        with pytest.raises(AuthenticationError) as caught:
            await client.list_sandboxes()
    assert len(rec.requests) == 1
    assert "MODBOX_API_TOKEN" in str(caught.value)
    assert rec.requests[0].headers["Authorization"] == f"Bearer {TOKEN}"


async def test_401_without_a_token_says_to_set_one() -> None:
    rec = Recorder(envelope(401, "unauthenticated", "missing bearer token"))
    async with client_for(rec, token=None) as client:
        with pytest.raises(AuthenticationError) as caught:
            await client.get_sandbox("sb-1")
    assert "Authorization" not in rec.requests[0].headers
    assert "no API token is configured: set MODBOX_API_TOKEN" in str(caught.value)


async def test_legacy_fastapi_422_body_is_parsed_and_not_retried() -> None:
    body = {
        "detail": [
            {
                "loc": ["body", "ttl_seconds"],
                "msg": "ensure this value is greater than or equal to 60",
                "type": "value_error.number.not_ge",
            }
        ]
    }
    rec = Recorder(httpx.Response(422, json=body))
    async with client_for(rec) as client:
        with pytest.raises(ValidationError) as caught:
            await client.create_sandbox(ttl_seconds=5)
    assert len(rec.requests) == 1
    assert caught.value.status_code == 422
    assert "body.ttl_seconds: ensure this value is greater than or equal to 60" in str(caught.value)
    assert caught.value.details == [
        {"field": "body.ttl_seconds", "issue": "ensure this value is greater than or equal to 60"}
    ]


async def test_workspace_header_goes_to_sandbox_routes() -> None:
    rec = Recorder(httpx.Response(200, json={"sandboxes": [], "total": 0}))
    async with client_for(rec, workspace_id="ws-42") as client:
        assert await client.list_sandboxes(status="running") == []
    assert rec.requests[0].headers["x-workspace-id"] == "ws-42"
    assert rec.requests[0].url.params["status"] == "running"


# --- control plane: unreachable ------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_refused_connection_is_service_unreachable_naming_the_url() -> None:
    # A real refused connect on loopback, not a mock.
    port = _closed_port()
    async with ModboxClient(f"http://127.0.0.1:{port}", TOKEN, max_attempts=2) as client:
        with pytest.raises(ServiceUnreachableError) as caught:
            await client.get_sandbox("sb-1")
        assert await client.health() is False
    message = str(caught.value)
    assert f"http://127.0.0.1:{port}/sandboxes/sb-1" in message
    assert "MODBOX_API_URL" in message
    assert_no_secret(message, repr(caught.value))


async def test_connect_error_names_the_full_url_under_a_path_prefix() -> None:
    rec = Recorder(httpx.ConnectError("[Errno 111] Connection refused"))
    client = ModboxClient(
        "https://modbox.test:8443/api/", TOKEN, transport=rec.transport, max_attempts=2
    )
    async with client:
        with pytest.raises(ServiceUnreachableError) as caught:
            await client.destroy_sandbox("sb-1")
    assert len(rec.requests) == 2
    assert "https://modbox.test:8443/api/sandboxes/sb-1" in str(caught.value)
    assert "MODBOX_API_URL" in str(caught.value)
    assert_no_secret(str(caught.value), repr(client))


@pytest.mark.parametrize(
    "url",
    [
        f"https://user:{TOKEN}@modbox.test",
        f"https://modbox.test/?key={TOKEN}",
        "modbox.test",
        "ftp://modbox.test",
    ],
)
def test_bad_base_url_is_a_configuration_error_without_secrets(url: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        ModboxClient(url, TOKEN)
    assert "MODBOX_API_URL" in str(caught.value)
    assert_no_secret(str(caught.value))


# --- control plane: wait, destroy ------------------------------------------------------


async def test_wait_loops_on_ready_false_then_reads_the_detail() -> None:
    detail = {
        "id": "sb-1",
        "name": "t1",
        "status": "running",
        "sandbox_url": "https://sb-1.sandbox.test",
        "capabilities": None,
        "expires_at": "2030-01-01T00:00:00Z",
    }
    rec = Recorder(
        httpx.Response(200, json={"ready": False, "reason": "timeout", "status": "provisioning"}),
        httpx.Response(200, json={"ready": False, "reason": "timeout", "status": "provisioning"}),
        httpx.Response(200, json={"ready": True, "status": "running"}),
        httpx.Response(200, json=detail),
    )
    async with client_for(rec) as client:
        info = await client.wait_until_running("sb-1", timeout=100)
    assert [(r.method, r.url.path) for r in rec.requests] == [
        ("POST", "/sandboxes/sb-1/wait")
    ] * 3 + [("GET", "/sandboxes/sb-1")]
    for request in rec.requests[:3]:
        body = json.loads(request.content)
        assert 1 <= body["timeout"] <= 30
        # A long poll needs a read timeout longer than the poll itself.
        assert request.extensions["timeout"]["read"] > body["timeout"]
    assert info.status == "running"
    assert info.sandbox_url == "https://sb-1.sandbox.test"
    assert info.expires_at == "2030-01-01T00:00:00Z"


async def test_wait_raises_provisioning_error_when_destroyed() -> None:
    rec = Recorder(
        httpx.Response(200, json={"ready": False, "reason": "destroyed", "status": "destroyed"})
    )
    async with client_for(rec) as client:
        with pytest.raises(ProvisioningError, match="destroyed while starting"):
            await client.wait_until_running("sb-1", timeout=10)
    assert len(rec.requests) == 1


async def test_wait_gives_up_at_the_deadline() -> None:
    rec = Recorder(httpx.Response(200, json={"ready": False, "status": "provisioning"}))
    async with client_for(rec) as client:
        started = time.monotonic()
        with pytest.raises(ModboxTimeoutError) as caught:
            await client.wait_until_running("sb-1", timeout=1.5)
        elapsed = time.monotonic() - started
    assert 1.5 <= elapsed < 3.0
    assert "did not start within 1.5 s" in str(caught.value)
    assert "MODBOX_STARTUP_TIMEOUT" in str(caught.value)
    # The loop backs off instead of hammering a server that answers at once.
    assert len(rec.requests) < 15


async def test_destroy_is_false_on_404_and_true_on_success() -> None:
    rec = Recorder(
        httpx.Response(200, json={"success": True}),
        envelope(404, "sandbox_not_found", "no such sandbox"),
    )
    async with client_for(rec) as client:
        assert await client.destroy_sandbox("sb-1") is True
        assert await client.destroy_sandbox("sb-1") is False
    assert [r.method for r in rec.requests] == ["DELETE", "DELETE"]


def test_blocking_destroy_never_raises() -> None:
    port = _closed_port()
    assert destroy_sandbox_blocking(f"http://127.0.0.1:{port}", TOKEN, "sb-1", timeout=0.5) is False
    assert destroy_sandbox_blocking("not a url", TOKEN, "sb-1") is False


# --- runtime: exec is never blindly repeated -----------------------------------------


async def test_exec_is_not_retried_on_503() -> None:
    rec = Recorder(envelope(503, "internal_error", "busy"), exec_ok())
    async with client_for(rec) as client, client.runtime(running_info(), API_KEY) as rt:
        with pytest.raises(ServerError):
            await rt.exec("echo hi")
    assert len(rec.requests) == 1


async def test_exec_is_not_retried_on_a_read_error() -> None:
    rec = Recorder(httpx.ReadError("connection reset by peer"), exec_ok())
    async with client_for(rec) as client, client.runtime(running_info(), API_KEY) as rt:
        with pytest.raises(ServiceUnreachableError) as caught:
            await rt.exec("echo hi")
    assert len(rec.requests) == 1
    assert "may or may not have run" in str(caught.value)


async def test_exec_is_not_retried_on_a_read_timeout() -> None:
    rec = Recorder(httpx.ReadTimeout("timed out"), exec_ok())
    async with client_for(rec) as client, client.runtime(running_info(), API_KEY) as rt:
        with pytest.raises(ModboxTimeoutError) as caught:
            await rt.exec("sleep 100", read_timeout=7)
    assert len(rec.requests) == 1
    assert "within 7 s" in str(caught.value)


async def test_exec_is_retried_when_the_connect_failed() -> None:
    rec = Recorder(httpx.ConnectError("[Errno 111] Connection refused"), exec_ok())
    async with client_for(rec) as client, client.runtime(running_info(), API_KEY) as rt:
        result = await rt.exec("echo hi")
    assert len(rec.requests) == 2
    assert (result.exit_code, result.stdout, result.duration_ms) == (0, "hi\n", 3)


async def test_exec_body_and_read_timeout() -> None:
    rec = Recorder(exec_ok())
    async with (
        client_for(rec, read_timeout=30) as client,
        client.runtime(running_info(), None) as rt,
    ):
        await rt.exec("true")
        await rt.exec("sleep 50", timeout=60)
    plain, timed = rec.requests
    assert json.loads(plain.content) == {"command": "true"}
    assert plain.extensions["timeout"]["read"] == 30
    assert json.loads(timed.content) == {"command": "sleep 50", "timeout": 60}
    assert timed.extensions["timeout"]["read"] == 90


# --- runtime: URLs and credentials ---------------------------------------------------


async def test_runtime_prefers_capabilities_and_the_issued_token() -> None:
    rec = Recorder(exec_ok(), httpx.Response(200, json={"path": "/workspace/uploads/a.txt"}))
    async with client_for(rec) as client:
        create = SandboxInfo.from_json(provisioned().json())
        detail = SandboxInfo.from_json(
            {"id": "sb-1", "status": "running", "sandbox_url": "https://sb-1.sandbox.test"}
        )
        info = create.merged(detail)
        async with client.runtime(info, API_KEY) as rt:
            await rt.exec("true")
            meta = await rt.upload("a.txt", b"payload")
    assert str(rec.requests[0].url) == "https://sb-1.sandbox.test/cap/exec"
    assert str(rec.requests[1].url) == "https://sb-1.sandbox.test/cap/files/upload"
    assert all(r.headers["Authorization"] == f"Bearer {ACCESS}" for r in rec.requests)
    assert b'name="file"; filename="a.txt"' in rec.requests[1].content
    assert meta == {"path": "/workspace/uploads/a.txt"}


async def test_runtime_falls_back_to_sandbox_url_and_api_key() -> None:
    rec = Recorder(envelope(401, "invalid_token", "bad token"), exec_ok(), exec_ok())
    async with client_for(rec) as client:
        async with client.runtime(running_info(), API_KEY) as rt:
            await rt.exec("true")
            await rt.exec("true")
    assert [str(r.url) for r in rec.requests] == ["https://sb-1.sandbox.test/modbox/api/exec"] * 3
    # The issued token first; once refused (the command did not run), SANDBOX_API_KEY.
    assert [r.headers["Authorization"] for r in rec.requests] == [
        f"Bearer {ACCESS}",
        f"Bearer {API_KEY}",
        f"Bearer {API_KEY}",
    ]


async def test_runtime_401_with_no_fallback_names_the_runtime_credential() -> None:
    rec = Recorder(envelope(401, "invalid_token", "bad token"))
    async with client_for(rec) as client, client.runtime(running_info(), None) as rt:
        with pytest.raises(AuthenticationError) as caught:
            await rt.upload("x", b"x")
    assert len(rec.requests) == 1
    assert "SANDBOX_API_KEY" in str(caught.value)


def test_merged_keeps_create_time_token_and_capabilities() -> None:
    create = SandboxInfo.from_json(provisioned().json(), name="t1")
    detail = SandboxInfo.from_json(
        {"id": "sb-1", "name": "t1", "status": "running", "sandbox_url": "https://x"}
    )
    merged = create.merged(detail)
    assert merged.status == "running"
    assert merged.sandbox_url == "https://x"
    assert merged.access_token == ACCESS
    assert merged.capabilities["exec"] == "https://sb-1.sandbox.test/cap/exec"
    assert merged.api_url == "https://sb-1.sandbox.test/modbox/api"


# --- retry policy (sans-IO) ----------------------------------------------------------


def test_retry_after_forms() -> None:
    now = time.time()
    assert parse_retry_after(httpx.Headers({"Retry-After": "7"})) == 7.0
    assert parse_retry_after(httpx.Headers({"retry-after-ms": "1500"})) == 1.5
    date = formatdate(now + 30, usegmt=True)
    assert 28 <= (parse_retry_after(httpx.Headers({"Retry-After": date}), now=now) or 0) <= 31
    assert parse_retry_after(httpx.Headers({"Retry-After": "soon-ish"})) is None
    assert parse_retry_after(httpx.Headers({})) is None


def test_retry_policy_modes_and_delays() -> None:
    policy = RetryPolicy(max_attempts=4, backoff_base=0.25, backoff_cap=8.0, max_retry_after=60.0)
    assert policy.should_retry_status(RetryMode.SAFE, 503)
    assert not policy.should_retry_status(RetryMode.SAFE, 409)
    assert not policy.should_retry_status(RetryMode.CONNECT_ONLY, 503)
    refused = httpx.ConnectError("refused")
    assert policy.should_retry_error(RetryMode.CONNECT_ONLY, refused)
    assert not policy.should_retry_error(RetryMode.CONNECT_ONLY, httpx.ReadError("reset"))
    assert policy.should_retry_error(RetryMode.SAFE, httpx.ReadError("reset"))
    assert not policy.should_retry_error(RetryMode.NEVER, refused)
    for attempt in range(1, 10):
        assert 0 <= policy.delay(attempt) <= min(8.0, 0.25 * 2 ** (attempt - 1))
    assert policy.delay(1, retry_after=3) == 3  # the server's wait is a floor
    assert policy.delay(1, retry_after=3600) == 60  # but capped


# --- secrets -------------------------------------------------------------------------


async def test_no_token_in_reprs_messages_or_debug_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    rec = Recorder(
        envelope(401, "invalid_token", "bad token"),
        envelope(503, "internal_error", "down"),
        httpx.ConnectError("refused"),
        provisioned(),
        httpx.ReadError("reset"),
    )
    texts: list[str] = []
    async with client_for(rec, max_attempts=1) as client:
        texts.append(repr(client))
        for call in (client.get_sandbox, client.destroy_sandbox, client.get_sandbox):
            with pytest.raises(Exception) as caught:
                await call("sb-1")
            texts += [str(caught.value), repr(caught.value)]
        info = await client.create_sandbox(env_vars={"SANDBOX_API_KEY": API_KEY})
        texts += [repr(info), str(info)]
        async with client.runtime(info.merged(running_info(access_token=None)), API_KEY) as rt:
            texts.append(repr(rt))
            with pytest.raises(ServiceUnreachableError) as caught:
                await rt.exec("echo secret-free")
            texts += [str(caught.value), repr(caught.value)]
    # The secrets did go over the wire, so their absence below means something.
    assert any(TOKEN in r.headers.get("Authorization", "") for r in rec.requests)
    assert any(ACCESS in r.headers.get("Authorization", "") for r in rec.requests)
    assert any("DEBUG" == rec_.levelname for rec_ in caplog.records)
    assert_no_secret(caplog.text, *texts)


def test_plain_http_clients_skip_the_ca_bundle_and_https_ones_share_a_verifying_one() -> None:
    """Loading the CA bundle costs every kernel start tens of ms; only https needs it."""
    import ssl

    from modbox_kernel.api.urls import tls_context_for

    plain = tls_context_for("http://127.0.0.1:8080", "http://127.0.0.1:8080/up")
    # Never used for a handshake; if it were, it would refuse (nothing is trusted).
    assert plain.verify_mode == ssl.CERT_REQUIRED and plain.check_hostname
    assert plain.cert_store_stats()["x509_ca"] == 0
    secure = tls_context_for("https://api.modbox.run")
    assert secure.verify_mode == ssl.CERT_REQUIRED and secure.check_hostname
    assert secure.cert_store_stats()["x509_ca"] > 0
    assert tls_context_for("http://127.0.0.1:1", "https://files.example") is secure
