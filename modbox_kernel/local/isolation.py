"""Choosing the isolation mode at startup: bwrap if a real probe jail works, else none.

Who calls it: ``__main__``, once, before the server starts (blocking calls are fine
there). :func:`choose_jail` returns the :class:`~.jail.Jail` every sandbox will use, or
raises :class:`StartupError` with a sentence when the requested isolation cannot be had.

Why a full probe: ``bwrap --version`` working says nothing about user namespaces,
``/proc`` mounting in containers, or the Python binds (reliability.md §2.7), so the
probe starts the exact jail shape a sandbox gets and waits for the supervisor's hello.
In ``auto`` mode a failed probe falls back to ``none`` with a loud warning; with
``MODBOX_REQUIRE_ISOLATION=1`` (or ``--isolation bwrap``) it is a startup error instead
— never a silent downgrade.
"""

from __future__ import annotations

import logging
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

from .config import Limits
from .jail import OPTIONAL_BWRAP_FLAGS, REQUIRED_BWRAP_FLAGS, BwrapJail, Jail, JailSpec

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 30.0


class StartupError(Exception):
    """The service cannot start as configured; ``str()`` says why and what to change."""


def choose_jail(requested: str, require: bool, limits: Limits, state_dir: Path) -> Jail:
    prlimit = shutil.which("prlimit")
    if prlimit is None:
        raise StartupError(
            "prlimit (util-linux) was not found on PATH; it sets the sandboxes' resource "
            "limits. Install util-linux."
        )
    if requested == "none":
        if require:
            raise StartupError(
                "MODBOX_REQUIRE_ISOLATION=1 is set but --isolation none was requested; "
                "use --isolation bwrap or auto."
            )
        log.warning("ISOLATION DISABLED (--isolation none): sandboxes run as plain host processes")
        return Jail(mode="none", prlimit=prlimit)
    try:
        jail = _bwrap_jail(prlimit)
        _probe(jail, limits, state_dir)
        return jail
    except StartupError as exc:
        if requested == "bwrap" or require:
            why = (
                "MODBOX_REQUIRE_ISOLATION=1 is set"
                if require
                else "--isolation bwrap was requested"
            )
            raise StartupError(
                f"{why} but bubblewrap cannot isolate sandboxes here: {exc}"
            ) from None
        log.warning(
            "!!! NO ISOLATION: bubblewrap is unusable (%s). Sandboxes will run as plain host "
            "processes with only rlimits; do not run untrusted code. Set "
            "MODBOX_REQUIRE_ISOLATION=1 to refuse to start instead. !!!",
            exc,
        )
        return Jail(mode="none", prlimit=prlimit)


def _bwrap_jail(prlimit: str) -> BwrapJail:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise StartupError("the bwrap executable was not found on PATH (install bubblewrap)")
    try:
        help_text = subprocess.run(
            [bwrap, "--help"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise StartupError(f"'bwrap --help' failed: {exc}") from None
    missing = [f for f in REQUIRED_BWRAP_FLAGS if f not in help_text]
    if missing:
        raise StartupError(f"this bwrap lacks {', '.join(missing)} (bubblewrap >= 0.8 needed)")
    optional = frozenset(f for f in OPTIONAL_BWRAP_FLAGS if f in help_text)
    for flag in set(OPTIONAL_BWRAP_FLAGS) - optional:
        log.warning("bwrap lacks %s; nested user namespaces stay possible in sandboxes", flag)
    return BwrapJail(prlimit=prlimit, bwrap=bwrap, optional_flags=optional)


def _probe(jail: BwrapJail, limits: Limits, state_dir: Path) -> None:
    """Start a real jail with stdin closed: a working one says hello and exits."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="probe-", dir=state_dir) as workspace:
        spec = JailSpec("probe", Path(workspace), limits)
        try:
            done = subprocess.run(
                jail.argv(spec),
                env=jail.env(spec),
                cwd=workspace,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=PROBE_TIMEOUT_S,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise StartupError(f"the probe sandbox could not run: {exc}") from None
    out = done.stdout
    if len(out) >= 4:
        (length,) = struct.unpack(">I", out[:4])
        if b'"hello":true' in out[4 : 4 + length]:
            return
    detail = done.stderr.decode("utf-8", "replace").strip().splitlines()
    reason = detail[-1] if detail else f"exit code {done.returncode}"
    raise StartupError(f"the probe sandbox failed ({reason})")
