"""The official modbox-sdk drives the local service: every route it uses parses.

This is the "Modbox-compatible, not a private protocol" check (see docs/architecture.md):
the SDK's pydantic models reject a missing required field or a wrong type, so a shape drift
in the service fails here. Canonical and legacy routes are both exercised.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest
from modbox import AsyncModboxApi, ModboxApi
from modbox.core.api_error import ApiError
from modbox.errors import NotFoundError, UnprocessableEntityError
from modbox.types import ProvisionResponse, SandboxDetail, SandboxListResponse
from service_helpers import LocalService

NO_RETRY = {"max_retries": 0}  # the SDK retries 409 and 5xx twice with backoff


@pytest.fixture
def sdk(local_service: LocalService) -> Iterator[ModboxApi]:
    yield ModboxApi(base_url=local_service.base_url, token=local_service.token, timeout=60)


def _name() -> str:
    return f"contract-{uuid.uuid4().hex[:8]}"


def test_health_and_images(sdk: ModboxApi) -> None:
    health = sdk.system.health_check()
    assert health["status"] == "ok"
    images = sdk.images.list_sandbox_images()
    assert images.total == 1
    (image,) = images.images
    assert image.name == "local-python"
    assert image.image.startswith("local/python:3.")
    assert image.enabled and image.is_default


def test_canonical_lifecycle(sdk: ModboxApi) -> None:
    name = _name()
    image = sdk.images.list_sandbox_images().images[0]
    created = sdk.sandboxes.create_sandbox(task_id=name, ttl_seconds=600, image_id=image.id)
    assert isinstance(created, ProvisionResponse)
    assert created.success and created.status == "provisioning" and created.sandbox_id
    assert created.endpoint is not None and created.endpoint.access_token
    assert created.capabilities is not None
    assert created.capabilities["exec"] == f"{created.endpoint.api_url}/exec"
    assert created.capabilities["files"] == f"{created.endpoint.api_url}/files"
    sid = created.sandbox_id

    waited = sdk.sandboxes.wait_for_sandbox_canonical(sid, timeout=60)
    assert waited.ready and waited.status == "running"
    assert waited.elapsed_seconds is not None

    detail = sdk.sandboxes.get_sandbox_canonical(sid)
    assert isinstance(detail, SandboxDetail)
    assert detail.id == sid and detail.name == name and detail.status == "running"
    assert detail.sandbox_url == created.endpoint.base_url
    assert detail.capabilities == created.capabilities
    assert detail.expires_at is not None
    assert 590 <= (detail.expires_at - detail.created_at).total_seconds() <= 600
    assert "access_token" not in detail.model_dump_json()  # only the create answer has it

    status = sdk.sandboxes.get_sandbox_status_canonical(sid)
    assert status.ready and status.name == name

    running = sdk.sandboxes.list_sandboxes(status="running")
    assert isinstance(running, SandboxListResponse)
    assert sid in {s.id for s in running.sandboxes}

    deleted = sdk.sandboxes.delete_sandbox(sid)
    assert deleted.success
    assert sdk.sandboxes.delete_sandbox(sid).success  # idempotent

    after = sdk.sandboxes.get_sandbox_canonical(sid)
    assert after.status == "destroyed" and after.destroyed_at is not None
    assert after.sandbox_url is None
    destroyed = sdk.sandboxes.list_sandboxes(status="destroyed")
    assert sid in {s.id for s in destroyed.sandboxes}
    assert sid not in {s.id for s in sdk.sandboxes.list_sandboxes(status="running").sandboxes}
    waited_after = sdk.sandboxes.wait_for_sandbox_canonical(sid, timeout=1)
    assert not waited_after.ready and waited_after.status == "destroyed"


def test_legacy_lifecycle(sdk: ModboxApi) -> None:
    name = _name()
    created = sdk.sandboxes.provision_sandbox(task_id=name, ttl_seconds=120)
    assert created.success and created.sandbox_id
    waited = sdk.sandboxes.wait_for_sandbox(task_id=name, timeout=60, poll_interval=1)
    assert waited.ready and waited.status == "running"
    assert sdk.sandboxes.get_sandbox_status(name).ready
    detail = sdk.sandboxes.get_sandbox(created.sandbox_id)
    assert detail.name == name and detail.status == "running"
    assert sdk.sandboxes.destroy_sandbox(task_id=name).success
    assert sdk.sandboxes.get_sandbox(created.sandbox_id).status == "destroyed"
    # The name is free again once its sandbox is destroyed.
    again = sdk.sandboxes.provision_sandbox(task_id=name)
    assert again.sandbox_id != created.sandbox_id
    assert sdk.sandboxes.destroy_sandbox(task_id=name).success


def test_list_is_newest_first_and_keeps_destroyed(sdk: ModboxApi) -> None:
    first = sdk.sandboxes.create_sandbox(task_id=_name())
    second = sdk.sandboxes.create_sandbox(task_id=_name())
    sdk.sandboxes.delete_sandbox(first.sandbox_id)
    ids = [s.id for s in sdk.sandboxes.list_sandboxes().sandboxes]
    assert ids.index(second.sandbox_id) < ids.index(first.sandbox_id)
    sdk.sandboxes.delete_sandbox(second.sandbox_id)


def test_generated_name_and_idempotency_key(sdk: ModboxApi) -> None:
    key = uuid.uuid4().hex
    one = sdk.sandboxes.create_sandbox(idempotency_key=key)
    two = sdk.sandboxes.create_sandbox(idempotency_key=key)
    assert one.sandbox_id == two.sandbox_id
    assert one.endpoint == two.endpoint
    detail = sdk.sandboxes.get_sandbox_canonical(one.sandbox_id)
    assert detail.name  # generated when no task_id is given
    other = sdk.sandboxes.create_sandbox()
    assert other.sandbox_id != one.sandbox_id
    assert sdk.sandboxes.get_sandbox_canonical(other.sandbox_id).name != detail.name
    for sid in (one.sandbox_id, other.sandbox_id):
        sdk.sandboxes.delete_sandbox(sid)


def test_duplicate_live_name_conflicts(sdk: ModboxApi) -> None:
    name = _name()
    created = sdk.sandboxes.create_sandbox(task_id=name)
    # The SDK types 409 only on other routes; here it is a generic ApiError (see
    # docs/modbox-api.md), whose body is the raw envelope.
    with pytest.raises(ApiError) as caught:
        sdk.sandboxes.create_sandbox(task_id=name, request_options=NO_RETRY)
    assert caught.value.status_code == 409
    assert caught.value.body["error"]["code"] == "sandbox_name_conflict"
    sdk.sandboxes.delete_sandbox(created.sandbox_id)


def test_unknown_ids_are_sdk_not_found_errors(sdk: ModboxApi) -> None:
    missing = str(uuid.uuid4())
    calls = [
        lambda: sdk.sandboxes.get_sandbox_canonical(missing),
        lambda: sdk.sandboxes.get_sandbox(missing),
        lambda: sdk.sandboxes.delete_sandbox(missing),
        lambda: sdk.sandboxes.get_sandbox_status_canonical(missing),
        lambda: sdk.sandboxes.wait_for_sandbox_canonical(missing, timeout=1),
        lambda: sdk.sandboxes.get_sandbox_status("no-such-task"),
        lambda: sdk.sandboxes.wait_for_sandbox(task_id="no-such-task", timeout=1),
        lambda: sdk.sandboxes.destroy_sandbox(task_id="no-such-task"),
    ]
    for call in calls:
        with pytest.raises(NotFoundError) as caught:
            call()
        error = caught.value.body.error  # parsed into the SDK's ErrorResponse model
        assert error.code == "sandbox_not_found"
        assert error.message and error.request_id


def test_unknown_image_and_bad_ttl_are_sdk_errors(sdk: ModboxApi) -> None:
    with pytest.raises(NotFoundError) as caught:
        sdk.sandboxes.create_sandbox(image_id=str(uuid.uuid4()))
    assert caught.value.body.error.code == "image_not_found"
    with pytest.raises(UnprocessableEntityError) as invalid:
        sdk.sandboxes.create_sandbox(ttl_seconds=59)
    assert invalid.value.body.error.details[0].field == "body.ttl_seconds"


def test_null_optional_fields_are_accepted(local_service: LocalService) -> None:
    # The SDK sends null for fields explicitly set to None (see docs/modbox-api.md).
    body = {
        k: None
        for k in (
            "task_id",
            "client_reference",
            "image_id",
            "image",
            "env_vars",
            "ttl_seconds",
            "fast_start",
        )
    }
    with local_service.client() as control:
        created = control.post("/sandboxes", json=body)
        assert created.status_code == 200, created.text
        sid = created.json()["sandbox_id"]
        waited = control.post(
            f"/sandboxes/{sid}/wait", json={"poll_interval": None, "timeout": None}
        )
        assert waited.status_code == 200 and waited.json()["ready"]
        assert control.delete(f"/sandboxes/{sid}").json() == {"success": True}


async def test_async_sdk(local_service: LocalService) -> None:
    sdk = AsyncModboxApi(
        base_url=local_service.base_url,
        token=local_service.token,
        httpx_client=httpx.AsyncClient(timeout=60),
    )
    created = await sdk.sandboxes.create_sandbox(task_id=_name())
    waited = await sdk.sandboxes.wait_for_sandbox_canonical(created.sandbox_id, timeout=60)
    assert waited.ready
    assert (await sdk.sandboxes.delete_sandbox(created.sandbox_id)).success
