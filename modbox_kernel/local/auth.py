"""Bearer-token checks for the control plane and the per-sandbox runtime API.

Who calls it: every authenticated route, first thing. Control-plane routes accept the
service token (the admin) or an owner credential derived from it (``owners``); a
sandbox's runtime routes accept that sandbox's ``access_token`` or
the ``SANDBOX_API_KEY`` its creator put in ``env_vars`` (the two documented runtime
credentials, ``docs/modbox-api.md``, "Runtime auth"), and nothing of any other sandbox.
Comparison is constant-time so response timing leaks no prefix of a token.
"""

from __future__ import annotations

import hmac

from starlette.requests import Request

from . import owners
from .envelope import ServiceError


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def token_matches(given: str | None, expected: str | None) -> bool:
    if not given or not expected:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def require_principal(request: Request, secret: str) -> str | None:
    """The control plane's caller: None for the admin (the service token), else the
    owner an owner credential names (``owners``). Anything else is a 401."""
    return require_caller(request, secret)[0]


def require_caller(request: Request, secret: str) -> tuple[str | None, str | None]:
    """(owner, role) of the control plane's caller: (None, None) for the admin; a 401
    for anything but the service token or a valid owner credential."""
    given = bearer_token(request)
    if given is not None and not token_matches(given, secret):
        found = owners.identify(secret, given)
        if found is not None:
            return found
    require_token(request, secret)
    return None, None


def require_token(request: Request, *accepted: str | None) -> None:
    """Raise 401 unless the request's bearer token equals one of ``accepted``."""
    given = bearer_token(request)
    if given is None:
        raise ServiceError(
            401,
            "unauthenticated",
            "Authentication required: send 'Authorization: Bearer <token>'.",
            headers={"WWW-Authenticate": "Bearer"},
        )
    # Check every candidate (no short-circuit) so timing does not say which one matched.
    results = [token_matches(given, expected) for expected in accepted]
    if not any(results):
        raise ServiceError(
            401,
            "invalid_token",
            "The bearer token was not accepted.",
            hint="Use the token this service printed at startup (control plane) or the "
            "sandbox's access_token (runtime API).",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
