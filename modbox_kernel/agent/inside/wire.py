"""The wire format: how requests are decoded and how events become JSON.

Used by ``ops`` (decoding a request line), ``core`` and the runners (snapshotting the
events user code produces) and ``server`` (encoding answers).
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any, Dict

Event = Dict[str, Any]

#: Largest response (sum of serialized events) the agent sends in one answer.
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
#: A stream event stops absorbing more text at this size, so one event stays small.
MERGE_LIMIT = 1024 * 1024
#: Longest accepted request line (inline requests are meant to stay under 64 KiB).
MAX_REQUEST_LINE = 64 * 1024 * 1024
#: Upper bound for a long-poll, whatever the request asks.
MAX_WAIT_SECONDS = 60.0


def json_default(obj: Any) -> Any:
    """Make the odd values display data carries (bytes, numpy scalars, dates) JSON-able."""
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(obj)).decode("ascii")
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    for attr in ("isoformat", "item", "tolist"):
        method = getattr(obj, attr, None)
        if callable(method):
            try:
                return method()
            except Exception:
                pass
    return str(obj)


def snapshot(event: Event) -> Event:
    """A JSON round trip: the event no longer shares objects with user code.

    The user may mutate a dict after ``display()``; what was displayed must not change.
    """
    try:
        result: Event = json.loads(json.dumps(event, default=json_default))
        return result
    except (TypeError, ValueError) as exc:
        # Circular structures and the like: keep the event type, say what went wrong.
        fallback: Event = {k: v for k, v in event.items() if isinstance(v, (str, int, bool))}
        if "data" in event:
            fallback["data"] = {"text/plain": f"<output could not be serialized: {exc}>"}
            fallback["metadata"] = {}
        return fallback


def _text_mime(mime: str) -> bool:
    return mime.startswith("text/") or mime in (
        "image/svg+xml",
        "application/json",
        "application/javascript",
    )


def encode_mimebundle(data: Dict[str, Any]) -> Dict[str, Any]:
    """Binary image data becomes base64 text, as Jupyter messages carry it."""
    out: Dict[str, Any] = {}
    for mime, value in data.items():
        if isinstance(value, (bytes, bytearray)):
            raw = bytes(value)
            if _text_mime(mime):
                value = raw.decode("utf-8", "replace")
            else:
                value = base64.b64encode(raw).decode("ascii")
        out[str(mime)] = value
    return out


def decode_request(body: str) -> Any:
    """``B64`` inline, or ``@path`` of an uploaded JSON file (read, then deleted)."""
    if body.startswith("@"):
        path = body[1:]
        with open(path, "rb") as f:
            raw = f.read()
        try:
            os.unlink(path)
        except OSError:
            pass
        stripped = raw.strip()
        if not stripped.startswith(b"{"):
            stripped = base64.b64decode(stripped)  # an uploaded base64 body works too
        return json.loads(stripped.decode("utf-8"))
    return json.loads(base64.b64decode(body).decode("utf-8"))


#: Key of an answer holding its events already serialized (``cells.Cell.take``), which
#: :func:`encode_answer` writes instead of serializing ``events`` a second time.
ENCODED_EVENTS = "_events_json"


def encode_event(event: Event) -> str:
    """One event as it appears in an answer line."""
    return json.dumps(event, ensure_ascii=True, default=json_default)


def encode_answer(answer: Dict[str, Any]) -> bytes:
    """One ASCII JSON line (the bash line relays it with ``cat``)."""
    encoded = answer.pop(ENCODED_EVENTS, None)
    try:
        if encoded is None:
            body = json.dumps(answer, ensure_ascii=True, default=json_default)
        else:
            rest = {k: v for k, v in answer.items() if k != "events"}
            head = json.dumps(rest, ensure_ascii=True, default=json_default)
            body = head[:-1] + (", " if rest else "") + '"events": [' + ", ".join(encoded) + "]}"
    except (TypeError, ValueError) as exc:
        body = json.dumps({"ok": False, "error": f"unserializable answer: {exc}"})
    return body.encode("ascii") + b"\n"
