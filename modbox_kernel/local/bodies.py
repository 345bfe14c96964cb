"""Reading and validating request bodies without trusting their size or shape.

Who calls it: the route modules. Every body is read through :func:`read_body` (or a
:func:`limited` request for multipart), which answers 413 as soon as the declared or
actual size passes the limit, and the field helpers answer 422 with the Modbox
envelope's ``details`` for a wrong type or range. Missing and ``null`` optional fields
are treated alike (the SDK sends both, ``docs/modbox-api.md``, "Transport conventions").
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.types import Message

from .envelope import ServiceError, validation_error
from .files import too_large


def _check_declared(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise validation_error("header.content-length", "is not a number")
        if int(declared) > limit:
            raise too_large(limit)


async def read_body(request: Request, limit: int) -> bytes:
    _check_declared(request, limit)
    chunks = []
    size = 0
    # A caller that gives up mid-body raises ClientDisconnect here; the app's handler
    # answers it for every route (``app._on_client_disconnect``).
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def limited(request: Request, limit: int) -> Request:
    """The same request, but reading its body past ``limit`` bytes raises 413."""
    _check_declared(request, limit)
    receive = request.receive
    size = 0

    async def counting_receive() -> Message:
        nonlocal size
        message = await receive()
        if message["type"] == "http.request":
            size += len(message.get("body", b""))
            if size > limit:
                raise too_large(limit)
        return message

    return Request(request.scope, counting_receive)


async def read_json_object(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object; an empty body counts as ``{}``."""
    raw = await read_body(request, limit)
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ServiceError(
            422,
            "validation_error",
            f"The request body is not valid JSON: {exc}",
            details=[{"field": "body", "issue": "invalid JSON"}],
        ) from None
    if not isinstance(value, dict):
        raise validation_error("body", "must be a JSON object")
    return value


def opt_str(body: dict[str, Any], name: str, max_len: int = 255, min_len: int = 1) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise validation_error(f"body.{name}", "must be a string")
    if not min_len <= len(value) <= max_len:
        raise validation_error(f"body.{name}", f"length must be {min_len}-{max_len}")
    return value


def req_str(body: dict[str, Any], name: str, max_len: int = 255) -> str:
    value = opt_str(body, name, max_len)
    if value is None:
        raise validation_error(f"body.{name}", "is required")
    return value


def opt_int(body: dict[str, Any], name: str, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    # bool is an int in Python but not in JSON Schema; reject it like FastAPI would not.
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise validation_error(f"body.{name}", "must be an integer")
    if not lo <= int(value) <= hi:
        raise validation_error(f"body.{name}", f"must be between {lo} and {hi}")
    return int(value)


def opt_number(body: dict[str, Any], name: str, lo: float, hi: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise validation_error(f"body.{name}", "must be a number")
    if not lo < value <= hi:
        raise validation_error(f"body.{name}", f"must be greater than {lo:g} and at most {hi:g}")
    return float(value)


def opt_bool(body: dict[str, Any], name: str) -> bool | None:
    value = body.get(name)
    if value is None or isinstance(value, bool):
        return value
    raise validation_error(f"body.{name}", "must be a boolean")


def opt_env(body: dict[str, Any], name: str) -> dict[str, str]:
    """An env_vars map: NAME -> string; null values are dropped (the SDK allows them)."""
    value = body.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise validation_error(f"body.{name}", "must be an object of strings")
    env: dict[str, str] = {}
    for key, val in value.items():
        if (
            not key
            or not (key[0].isalpha() or key[0] == "_")
            or not all(c.isalnum() or c == "_" for c in key)
            or not key.isascii()
        ):
            raise validation_error(f"body.{name}.{key}", "is not a valid variable name")
        if val is None:
            continue
        if not isinstance(val, str) or "\0" in val:
            raise validation_error(f"body.{name}.{key}", "must be a string without NUL")
        if key == "MODBOX_SANDBOX_ID":
            raise validation_error(f"body.{name}.{key}", "is reserved")
        env[key] = val
    return env
