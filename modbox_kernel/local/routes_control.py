"""Control-plane routes: sandboxes (canonical and legacy), images, health.

Who calls it: ``app.build_app`` mounts :data:`routes`. Shapes are those of modbox-sdk
0.0.21 (see ``shapes``); literal segments (``provision``, ``wait``, ``destroy``,
``detail``, ``status``, ``realm``) are listed before the ``{sandbox_id}`` routes so they
win (``docs/modbox-api.md``, "Legacy routes"). Every route but ``/health`` needs the
service token.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from . import shapes
from .auth import require_caller, require_principal
from .bodies import opt_bool, opt_env, opt_int, opt_number, opt_str, read_json_object, req_str
from .envelope import ServiceError, validation_error
from .registry import STATUSES, ProvisionInput, Sandbox
from .state import ServiceState, service

WAIT_TIMEOUT_DEFAULT = 120.0
WAIT_TIMEOUT_MAX = 600.0


def _authed(request: Request) -> ServiceState:
    """The service, once the caller proved to be the admin or an owner (``owners``)."""
    return _caller(request)[0]


def _caller(request: Request) -> tuple[ServiceState, str | None]:
    """The service and who calls: None for the admin, else the owner (who sees only
    their own sandboxes)."""
    state = service(request)
    return state, require_principal(request, state.config.token)


async def health(request: Request) -> JSONResponse:
    state = service(request)
    return JSONResponse(
        {
            "status": "ok",
            "isolation": state.isolation,
            "limits": state.limits_note,
            "sandboxes": state.registry.live_count(pooled=False),
            "pooled": state.registry.pool.ready if state.registry.pool else 0,
        }
    )


async def list_sandboxes(request: Request) -> JSONResponse:
    state, owner = _caller(request)
    status = request.query_params.get("status") or None
    if status is not None and status not in STATUSES:
        raise validation_error("query.status", f"must be one of {', '.join(STATUSES)}")
    items = [shapes.list_item(state.base_url, s) for s in state.registry.list(status, owner)]
    return JSONResponse({"sandboxes": items, "total": len(items)})


async def create_sandbox(request: Request) -> JSONResponse:
    state = service(request)
    owner, role = require_caller(request, state.config.token)
    key = request.headers.get("idempotency-key") or None
    if key is not None and owner is not None:
        key = f"{owner}\x00{key}"  # one owner's key never replays another's answer
    if key is not None:
        replay = state.registry.idempotent_response(key)
        if replay is not None:
            return JSONResponse(replay)
    body = await read_json_object(request, state.config.limits.json_body_max)
    provision = _provision_input(state, body)
    # Another request with the same key may have finished while we read the body.
    if key is not None and (replay := state.registry.idempotent_response(key)) is not None:
        return JSONResponse(replay)
    sandbox = state.registry.create(provision, queue_key=key, owner=owner, role=role)
    answer = shapes.provision_response(state.base_url, sandbox)
    if state.config.limits.lease_seconds > 0:
        # Advertises the lease extension (additive: clients that ignore it keep the TTL).
        answer["lease_seconds"] = state.config.limits.lease_seconds
    if key is not None:
        state.registry.remember_idempotent(key, sandbox, answer)
    return JSONResponse(answer)


def _provision_input(state: ServiceState, body: dict[str, Any]) -> ProvisionInput:
    limits = state.config.limits
    name = opt_str(body, "task_id", 255)
    client_reference = opt_str(body, "client_reference", 1024, min_len=0)
    image_id = opt_str(body, "image_id", 255)
    image = opt_str(body, "image", 512)
    env = opt_env(body, "env_vars")
    ttl = opt_int(body, "ttl_seconds", limits.ttl_min, limits.ttl_max)
    opt_bool(body, "fast_start")  # accepted for compatibility; nothing to warm up here
    builtin = state.image
    if image_id is not None and image_id != builtin.id:
        raise _unknown_image(state, f"image_id {image_id!r}")
    if image_id is None and image is not None and image not in (builtin.image, builtin.name):
        raise _unknown_image(state, f"image {image!r}")
    return ProvisionInput(
        name=name,
        client_reference=client_reference,
        image=builtin.image,
        env_vars=env,
        ttl_seconds=ttl if ttl is not None else limits.ttl_default,
    )


def _unknown_image(state: ServiceState, what: str) -> ServiceError:
    return ServiceError(
        404,
        "image_not_found",
        f"This local service has no {what}.",
        hint=f"Omit it, or use image_id {state.image.id} ({state.image.image}).",
    )


async def get_sandbox(request: Request) -> JSONResponse:
    state, owner = _caller(request)
    sandbox = state.registry.get(request.path_params["sandbox_id"], owner)
    return JSONResponse(shapes.detail(state.base_url, sandbox))


async def sandbox_status(request: Request) -> JSONResponse:
    state, owner = _caller(request)
    sandbox = state.registry.get(request.path_params["sandbox_id"], owner)
    return JSONResponse(shapes.status_response(sandbox))


async def legacy_status(request: Request) -> JSONResponse:
    state, owner = _caller(request)
    sandbox = state.registry.find_by_name(request.path_params["task_id"], owner)
    return JSONResponse(shapes.status_response(sandbox))


async def wait_sandbox(request: Request) -> JSONResponse:
    state, owner = _caller(request)
    sandbox = state.registry.get(request.path_params["sandbox_id"], owner)
    body = await read_json_object(request, state.config.limits.json_body_max)
    return JSONResponse(await _wait(state, sandbox, body))


async def legacy_wait(request: Request) -> JSONResponse:
    state, owner = _caller(request)
    body = await read_json_object(request, state.config.limits.json_body_max)
    sandbox = state.registry.find_by_name(req_str(body, "task_id"), owner)
    return JSONResponse(await _wait(state, sandbox, body))


async def _wait(state: ServiceState, sandbox: Sandbox, body: dict[str, Any]) -> dict[str, Any]:
    opt_int(body, "poll_interval", 1, 60)  # validated; readiness is pushed, not polled
    timeout = opt_number(body, "timeout", 0, WAIT_TIMEOUT_MAX)
    return await state.registry.wait_ready(
        sandbox, timeout if timeout is not None else WAIT_TIMEOUT_DEFAULT
    )


async def delete_sandbox(request: Request) -> JSONResponse:
    state, owner = _caller(request)
    sandbox = state.registry.get(request.path_params["sandbox_id"], owner)
    await state.registry.destroy(sandbox)
    return JSONResponse({"success": True})


async def renew_lease(request: Request) -> JSONResponse:
    """An extension: keep the sandbox while its holder lives (see ``Registry.renew_lease``).

    The create answer advertises it as ``lease_seconds``; a client that never renews
    gets the TTL alone, as the Modbox API documents.
    """
    state, owner = _caller(request)
    sandbox = state.registry.get(request.path_params["sandbox_id"], owner)
    seconds = state.registry.renew_lease(sandbox)
    return JSONResponse({"success": True, "sandbox_id": sandbox.id, "lease_seconds": seconds})


async def legacy_destroy(request: Request) -> JSONResponse:
    state, owner = _caller(request)
    body = await read_json_object(request, state.config.limits.json_body_max)
    sandbox = state.registry.find_by_name(req_str(body, "task_id"), owner)
    await state.registry.destroy(sandbox)
    return JSONResponse({"success": True})


async def usage_report(request: Request) -> JSONResponse:
    """Usage per owner (``usage``): every owner for the admin, its own for an owner."""
    state, owner = _caller(request)
    live = [s for s in state.registry.list(owner=owner) if not s.torn_down]
    rows = state.registry.usage.report(live, owner)
    return JSONResponse({"owners": [asdict(row) for row in rows]})


async def list_images(request: Request) -> JSONResponse:
    state = _authed(request)
    return JSONResponse(
        {"images": [shapes.image_detail(state.image, state.config.limits)], "total": 1}
    )


async def get_image(request: Request) -> JSONResponse:
    state = _authed(request)
    if request.path_params["image_id"] != state.image.id:
        raise ServiceError(404, "image_not_found", "No such image on this local service.")
    return JSONResponse(shapes.image_detail(state.image, state.config.limits))


routes = [
    Route("/health", health, methods=["GET"]),
    Route("/usage", usage_report, methods=["GET"]),
    Route("/sandbox-images", list_images, methods=["GET"]),
    Route("/sandbox-images/{image_id}", get_image, methods=["GET"]),
    Route("/sandboxes", list_sandboxes, methods=["GET"]),
    Route("/sandboxes", create_sandbox, methods=["POST"]),
    Route("/sandboxes/provision", create_sandbox, methods=["POST"]),
    Route("/sandboxes/wait", legacy_wait, methods=["POST"]),
    Route("/sandboxes/destroy", legacy_destroy, methods=["POST"]),
    Route("/sandboxes/status/{task_id}", legacy_status, methods=["GET"]),
    Route("/sandboxes/detail/{sandbox_id}", get_sandbox, methods=["GET"]),
    Route("/sandboxes/realm/{realm}", list_sandboxes, methods=["GET"]),
    Route("/sandboxes/{sandbox_id}", get_sandbox, methods=["GET"]),
    Route("/sandboxes/{sandbox_id}", delete_sandbox, methods=["DELETE"]),
    Route("/sandboxes/{sandbox_id}/status", sandbox_status, methods=["GET"]),
    Route("/sandboxes/{sandbox_id}/wait", wait_sandbox, methods=["POST"]),
    Route("/sandboxes/{sandbox_id}/lease", renew_lease, methods=["POST"]),
]
