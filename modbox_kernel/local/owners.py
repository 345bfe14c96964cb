"""Owners: one credential per student, derived from the service's secret.

Who calls what, and when: every control-plane route asks :func:`principal` who is
calling. The service token (``--token`` / ``MODBOX_LOCAL_TOKEN``) is the admin: it
sees every sandbox. An *owner credential* ``mbo1:<owner>:<signature>`` (the signature
an HMAC of the owner's name under that token) is a student: it sees, waits on,
renews, destroys and creates only sandboxes of that owner (others answer 404, as if
they did not exist), and runs into the per-owner cap. Credentials need no database: a
hub computes each student's from the secret and the user name
(:func:`owner_token`, or ``python -m modbox_kernel.local token --owner NAME``) and hands
it to the student's server as ``MODBOX_API_TOKEN``. A tampered or forged credential is
a 401 envelope; no credential is ever logged.

A credential may also name a *role* (``mbo1:<owner>+<role>:<signature>``, the role
under the same signature): the service's ``--role`` gives that role its own memory
limit and per-owner cap (an instructor with more memory). The owner is the same with
or without a role, so an instructor's credentials see the same sandboxes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

PREFIX = "mbo1"
#: What an owner's name may be: a hub's user names (letters, digits, ``._@-``).
OWNER_NAME = re.compile(r"[A-Za-z0-9._@-]{1,64}")
#: What a role's name may be.
ROLE_NAME = re.compile(r"[A-Za-z0-9_-]{1,32}")


def owner_token(secret: str, owner: str, role: str | None = None) -> str:
    """The credential of ``owner`` (in ``role``) on the service whose token is ``secret``."""
    if not OWNER_NAME.fullmatch(owner):
        raise ValueError("an owner name is 1-64 letters, digits or ._@- characters")
    if role is not None and not ROLE_NAME.fullmatch(role):
        raise ValueError("a role name is 1-32 letters, digits, _ or - characters")
    name = owner if role is None else f"{owner}+{role}"
    return f"{PREFIX}:{name}:{_signature(secret, name)}"


def identify(secret: str, token: str) -> tuple[str, str | None] | None:
    """(owner, role) a credential names if its signature holds, else None
    (constant-time)."""
    prefix, _, rest = token.partition(":")
    name, _, signature = rest.rpartition(":")
    owner, _, role = name.partition("+")
    if prefix != PREFIX or not OWNER_NAME.fullmatch(owner):
        return None
    if "+" in name and not ROLE_NAME.fullmatch(role):
        return None
    expected = _signature(secret, name)
    if not hmac.compare_digest(signature.encode(), expected.encode()):
        return None
    return owner, (role if "+" in name else None)


def owner_of(secret: str, token: str) -> str | None:
    """The owner a credential names if its signature holds, else None."""
    found = identify(secret, token)
    return found[0] if found else None


def _signature(secret: str, owner: str) -> str:
    digest = hmac.new(secret.encode(), f"modbox-owner-v1:{owner}".encode(), hashlib.sha256)
    return base64.urlsafe_b64encode(digest.digest()).decode().rstrip("=")
