"""Choosing the isolation mode at startup: bwrap if a real probe jail works, else none.

Who calls it: ``__main__`` (and ``check``), once, before the server starts (blocking
calls are fine there). :func:`choose_jail` returns the :class:`~.jail.Jail` every
sandbox will use, or raises :class:`StartupError` with a sentence when the requested
isolation cannot be had.

Why a full probe: ``bwrap --version`` working says nothing about user namespaces,
``/proc`` mounting in containers, or the Python binds (``docs/isolation.md``, "Choosing
the mode: the probe"), so the probe starts the exact jail shape a sandbox gets
(launcher, privilege drop, seccomp) and waits for the supervisor's hello. In ``auto``
mode a failed probe falls back to ``none`` with a loud warning; with
``MODBOX_REQUIRE_ISOLATION=1`` (or ``--isolation bwrap``) it is a startup error
instead — never a silent downgrade.

As root, the preferred jail drops to the unprivileged sandbox uid before bwrap
(``launcher``). If that jail cannot start here (e.g. unprivileged user namespaces are
disabled) but bwrap as root can, the service uses the latter and says loudly that
sandboxes run as uid 0 outside (all capabilities still dropped).
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

from . import probecache, seccomp
from .config import Limits, ServiceConfig
from .jail import OPTIONAL_BWRAP_FLAGS, REQUIRED_BWRAP_FLAGS, BwrapJail, Jail, JailSpec
from .launcher import Privilege

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 30.0


class StartupError(Exception):
    """The service cannot start as configured; ``str()`` says why and what to change."""


def choose_jail(config: ServiceConfig, *, remembered: bool = True) -> Jail:
    """The jail for this service; ``remembered``: a probe that passed earlier this boot
    with the same jail need not run again (``probecache``; ``--check`` always probes)."""
    prlimit = shutil.which("prlimit")
    if prlimit is None:
        raise StartupError(
            "prlimit (util-linux) was not found on PATH; it sets the sandboxes' resource "
            "limits. Install util-linux."
        )
    require = config.require_isolation
    if config.isolation == "none":
        if require:
            raise StartupError(
                "MODBOX_REQUIRE_ISOLATION=1 is set but --isolation none was requested; "
                "use --isolation bwrap or auto."
            )
        log.warning("ISOLATION DISABLED (--isolation none): sandboxes run as plain host processes")
        return Jail(mode="none", prlimit=prlimit)
    try:
        return _working_bwrap_jail(config, prlimit, remembered)
    except StartupError as exc:
        if config.isolation == "bwrap" or require:
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


def _working_bwrap_jail(config: ServiceConfig, prlimit: str, remembered: bool) -> BwrapJail:
    bwrap = _find_bwrap(config.bwrap)
    optional = _bwrap_flags(bwrap)
    program = seccomp.filter_program()
    candidates = [Privilege()]
    if os.geteuid() == 0:
        candidates.insert(0, _dropped_privilege(config))
    failures = []
    for privilege in candidates:
        jail = BwrapJail(
            prlimit=prlimit,
            privilege=privilege,
            bwrap=bwrap,
            optional_flags=optional,
            seccomp_program=program,
        )
        key = probecache.probe_key(jail)
        if remembered and probecache.passed_before(key):
            log.info("this bubblewrap jail passed its probe earlier this boot; not probing again")
        else:
            try:
                _probe(jail, config.limits, config.state_dir)
            except StartupError as exc:
                failures.append(str(exc))
                continue
            probecache.remember(key)
        if failures:
            log.warning(
                "!!! DEGRADED ISOLATION: the jail with an unprivileged sandbox uid failed (%s); "
                "sandboxes run as uid 0 outside their namespaces (all capabilities dropped, "
                "RLIMIT_NPROC void). !!!",
                failures[0],
            )
        return jail
    raise StartupError("; ".join(failures))


def _find_bwrap(explicit: str | None) -> str:
    if explicit:
        if not (os.path.isfile(explicit) and os.access(explicit, os.X_OK)):
            raise StartupError(f"the bwrap executable {explicit!r} does not exist or cannot run")
        return explicit
    found = shutil.which("bwrap")
    if found is None:
        raise StartupError("the bwrap executable was not found on PATH (install bubblewrap)")
    return found


def _bwrap_flags(bwrap: str) -> frozenset[str]:
    try:
        help_text = subprocess.run(
            [bwrap, "--help"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise StartupError(f"'{bwrap} --help' failed: {exc}") from None
    missing = [f for f in REQUIRED_BWRAP_FLAGS if f not in help_text]
    if missing:
        raise StartupError(
            f"{bwrap} is not a usable bubblewrap: it lacks {', '.join(missing)} "
            "(bubblewrap >= 0.8 needed)"
        )
    optional = frozenset(f for f in OPTIONAL_BWRAP_FLAGS if f in help_text)
    for flag in set(OPTIONAL_BWRAP_FLAGS) - optional:
        log.warning("bwrap lacks %s; nested user namespaces stay possible in sandboxes", flag)
    return optional


def _dropped_privilege(config: ServiceConfig) -> Privilege:
    """The root case: setpriv to the sandbox uid, with a stage dir the uid can reach."""
    setpriv, unshare = shutil.which("setpriv"), shutil.which("unshare")
    if setpriv is None or unshare is None:
        # Still a candidate: its probe fails with this sentence and the root jail is used.
        return Privilege(drop=(config.sandbox_uid, config.sandbox_gid), setpriv="setpriv-missing")
    stage = config.state_dir / "stage"
    stage.mkdir(mode=0o755, exist_ok=True)
    # The dropped uid must traverse the state dir to reach the stage mount point (and
    # nothing more: workspaces are tmpfs inside the jails, none live here under bwrap).
    config.state_dir.chmod(0o711)
    return Privilege(
        drop=(config.sandbox_uid, config.sandbox_gid),
        setpriv=setpriv,
        unshare=unshare,
        stage_dir=stage,
    )


def _probe(jail: BwrapJail, limits: Limits, state_dir: Path) -> None:
    """Start a real jail with stdin closed: a working one says hello and exits."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="probe-", dir=state_dir) as workspace:
        spec = JailSpec("probe", Path(workspace), limits)
        launch = jail.launch(spec)
        try:
            done = subprocess.run(
                launch.argv,
                env=launch.env,
                cwd=workspace,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=PROBE_TIMEOUT_S,
                pass_fds=launch.pass_fds,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise StartupError(f"the probe sandbox could not run: {exc}") from None
        finally:
            launch.close()
    out = done.stdout
    if len(out) >= 4:
        (length,) = struct.unpack(">I", out[:4])
        if b'"hello":true' in out[4 : 4 + length]:
            return
    detail = done.stderr.decode("utf-8", "replace").strip().splitlines()
    reason = detail[-1] if detail else f"exit code {done.returncode}"
    raise StartupError(f"the probe sandbox failed ({reason})")
