"""Where requests go: base-URL checks, sandbox paths, runtime URLs, safe URL text.

Pure functions used by :mod:`.client`, :mod:`.runtime` and :mod:`.blocking`. The runtime
URL rules follow ``docs/modbox-api.md``, "Runtime URL": prefer ``capabilities.exec`` /
``capabilities.files`` (the SDK says paths differ between images), else the older
guides' ``{sandbox_url}/modbox/api/...``.
"""

from __future__ import annotations

import functools
import ipaddress
import ssl
from urllib.parse import quote

import httpx

from modbox_kernel.errors import ConfigurationError, SandboxError

from .models import SandboxInfo

__all__ = [
    "check_base_url",
    "exec_url",
    "redact_url",
    "sandbox_path",
    "tls_context_for",
    "trust_env_for",
    "upload_url",
]

_RUNTIME_PREFIX = "/modbox/api"


def redact_url(url: str | httpx.URL) -> str:
    """``scheme://host[:port]/path`` only: no userinfo, no query, no fragment.

    Used in every message and log line that names a URL, because either part may
    hold a credential (``https://user:token@host``, ``?access_token=``).
    """
    try:
        parsed = httpx.URL(str(url))
    except (httpx.InvalidURL, TypeError):
        return "<invalid URL>"
    netloc = parsed.host
    if ":" in netloc:  # IPv6 literal
        netloc = f"[{netloc}]"
    if parsed.port is not None:
        netloc = f"{netloc}:{parsed.port}"
    return f"{parsed.scheme}://{netloc}{parsed.path}"


def check_base_url(base_url: str) -> str:
    """Return ``base_url`` without a trailing slash, or raise ConfigurationError.

    Checked up front so that a typo in MODBOX_API_URL is reported as one, not as a
    confusing transport error on the first call.
    """
    try:
        parsed = httpx.URL(base_url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise ConfigurationError(
            "the Modbox API URL is not a valid URL",
            hint="set MODBOX_API_URL to e.g. https://api.modbox.run",
        ) from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigurationError(
            f"the Modbox API URL {redact_url(base_url)!r} is not an http(s) URL",
            hint="set MODBOX_API_URL to e.g. https://api.modbox.run",
        )
    if parsed.userinfo:
        # httpx would turn userinfo into Basic auth and replace the bearer token.
        raise ConfigurationError(
            f"the Modbox API URL {redact_url(base_url)!r} contains credentials",
            hint="remove them from MODBOX_API_URL and set MODBOX_API_TOKEN instead",
        )
    if parsed.query or parsed.fragment:
        raise ConfigurationError(
            f"the Modbox API URL {redact_url(base_url)!r} has a query or fragment",
            hint="set MODBOX_API_URL to the bare base URL, e.g. https://api.modbox.run",
        )
    return base_url.rstrip("/")


def trust_env_for(url: str) -> bool:
    """Whether httpx should honour HTTP(S)_PROXY and friends for this URL.

    Remote Modbox may sit behind a corporate proxy, so the environment counts. The
    embedded service is on loopback: a proxy without a NO_PROXY entry for it would
    swallow every call, so proxies are ignored there.
    """
    host = httpx.URL(url).host
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


def sandbox_path(sandbox_id: str, suffix: str = "") -> str:
    """``/sandboxes/{id}{suffix}`` with the id percent-encoded.

    An id comes from a server answer or a user; encoding it keeps a stray ``/`` or
    ``?`` from addressing a different route.
    """
    return f"/sandboxes/{quote(sandbox_id, safe='')}{suffix}"


def _runtime_base(info: SandboxInfo) -> str:
    if info.sandbox_url:
        return info.sandbox_url.rstrip("/") + _RUNTIME_PREFIX
    if info.api_url:
        # Unknown whether api_url already ends in /modbox/api (docs/modbox-api.md,
        # "Runtime URL").
        base = info.api_url.rstrip("/")
        return base if base.endswith(_RUNTIME_PREFIX) else base + _RUNTIME_PREFIX
    raise SandboxError(
        f"sandbox {info.id} has no runtime URL yet (status {info.status or 'unknown'})",
        hint="wait until it is running (ModboxClient.wait_until_running) before exec",
    )


def exec_url(info: SandboxInfo) -> str:
    """Absolute URL of the sandbox's exec endpoint."""
    cap = info.capabilities.get("exec")
    return cap if cap else _runtime_base(info) + "/exec"


def upload_url(info: SandboxInfo) -> str:
    """Absolute URL of the sandbox's upload endpoint (``capabilities.files`` + /upload)."""
    cap = info.capabilities.get("files")
    return cap.rstrip("/") + "/upload" if cap else _runtime_base(info) + "/files/upload"


def tls_context_for(*urls: str) -> ssl.SSLContext:
    """The TLS context a client that sends to ``urls`` verifies servers with.

    httpx builds a verifying context (loading the whole CA bundle, 30-50 ms of CPU)
    for every client, even one that only ever speaks plain HTTP to loopback; with
    two clients per kernel and forty kernels starting on one host that is seconds of
    CPU. So: https URLs share one default context per process, and plain-HTTP URLs
    get an empty strict context that is never used for a handshake -- were a
    request ever to reach an https URL through it, verification would fail (no CA
    is loaded): closed, never open.
    """
    if any(httpx.URL(url).scheme == "https" for url in urls):
        return _verifying_context()
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


@functools.cache
def _verifying_context() -> ssl.SSLContext:
    # httpx's own defaults (certifi, SSL_CERT_FILE / SSL_CERT_DIR honoured).
    return httpx.create_ssl_context()
