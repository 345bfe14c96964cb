"""``python -m modbox_kernel.local``: run the embedded Modbox-compatible service.

Who runs it: the kernel (as a child process, with ``--port 0 --exit-with-parent``),
tests (``tests/conftest.py``) and people. Once listening it prints exactly one JSON
line to stdout — ``{"base_url", "token", "pid", "isolation"}`` — so the parent learns
where it is and how to authenticate; that line is the only place the token appears.
Logs go to stderr. SIGTERM/SIGINT (or the parent's death with
``--exit-with-parent``) destroy every sandbox and exit.

``--check`` instead starts one probe sandbox, prints which isolation features and
limits are in force on this host (``check``), and exits: 0 when sandboxes can be
isolated, or when they would merely run unisolated and isolation is not required; 2
when isolation is required (``MODBOX_REQUIRE_ISOLATION=1`` or ``--isolation bwrap``)
and cannot be had, as the service itself would refuse to start.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import resource
import secrets
import shutil
import signal
import socket
import sys
from datetime import datetime, timezone
from pathlib import Path

import uvicorn

from . import owners, usage
from .app import build_app
from .cgroups import detect as detect_cgroups
from .check import run_check
from .config import DEFAULT_SANDBOX_UID, GIB, MIB, Limits, Role, ServiceConfig, parse_role
from .isolation import StartupError, choose_jail
from .orphans import become_subreaper
from .pool import Pool
from .registry import Registry
from .shapes import builtin_image
from .stale import make_state_dir, reap_stale_state_dirs
from .state import ServiceState

log = logging.getLogger("modbox_kernel.local")

PARENT_POLL_S = 0.25


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    env = os.environ
    parser = argparse.ArgumentParser(
        prog="python -m modbox_kernel.local",
        description="Serve the Modbox API (control plane and sandbox runtime) for local "
        "sandboxes: bubblewrap jails, or plain processes where bwrap is unusable.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    parser.add_argument("--port", type=int, default=0, help="port to bind; 0 picks a free one")
    parser.add_argument(
        "--token",
        default=None,
        help="control-plane bearer token (default: $MODBOX_LOCAL_TOKEN, else random per start)",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="where sandbox workspaces live (default: a fresh temp dir, removed on exit)",
    )
    parser.add_argument(
        "--isolation",
        choices=["auto", "bwrap", "none"],
        default=env.get("MODBOX_LOCAL_ISOLATION", "auto"),
        help="auto: bwrap if a probe jail works, else none with a warning "
        "(default: $MODBOX_LOCAL_ISOLATION or auto)",
    )
    parser.add_argument(
        "--public-url",
        default=None,
        help="base URL to advertise in sandbox URLs and capabilities, e.g. a proxy in front "
        "of this service (default: the address it listens on; the startup line always "
        "gives that address)",
    )
    parser.add_argument(
        "--network",
        action="store_true",
        help="share the host's network with sandboxes (default: no network)",
    )
    parser.add_argument(
        "--exit-with-parent",
        action="store_true",
        help="exit (destroying all sandboxes) when the parent process dies",
    )
    parser.add_argument(
        "--bwrap",
        default=env.get("MODBOX_LOCAL_BWRAP") or None,
        help="the bwrap executable (default: $MODBOX_LOCAL_BWRAP, else bwrap on PATH)",
    )
    parser.add_argument(
        "--sandbox-uid",
        type=int,
        default=int(env.get("MODBOX_LOCAL_SANDBOX_UID") or DEFAULT_SANDBOX_UID),
        help="when the service runs as root, the unprivileged uid (and gid) sandboxes run "
        f"as (default: $MODBOX_LOCAL_SANDBOX_UID, else {DEFAULT_SANDBOX_UID})",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="print which isolation features and limits are in force here, then exit",
    )
    parser.add_argument(
        "--owner-token",
        metavar="OWNER",
        default=None,
        help="print the credential of OWNER (e.g. a hub user name) for the service whose "
        "token is --token / $MODBOX_LOCAL_TOKEN, then exit: that credential sees and "
        "holds only OWNER's sandboxes",
    )
    parser.add_argument(
        "--owner-role",
        metavar="ROLE",
        default=None,
        help="with --owner-token: the credential's role (see --role)",
    )
    limits = parser.add_argument_group("limits per sandbox")
    limits.add_argument("--exec-timeout", type=float, default=300.0, help="default exec limit (s)")
    limits.add_argument(
        "--output-cap-mib", type=int, default=16, help="per-stream exec output cap (MiB)"
    )
    limits.add_argument(
        "--memory-mib", type=int, default=2048, help="memory limit (MiB, cgroup; default 2048)"
    )
    limits.add_argument(
        "--memory-request-mib",
        type=int,
        default=512,
        help="what admission counts each sandbox at (MiB; default 512, at most the limit): "
        "a sandbox may use up to its limit, the host admits requests up to its budget",
    )
    limits.add_argument(
        "--cpus",
        type=float,
        default=0.0,
        help="hard CPU quota in CPUs (cgroup; default 0: none, sandboxes share the CPUs "
        "fairly, one cgroup each)",
    )
    limits.add_argument(
        "--cpu-seconds",
        type=int,
        default=0,
        help="RLIMIT_CPU per process in seconds (0 = off, the default)",
    )
    limits.add_argument(
        "--pids", type=int, default=512, help="processes and threads (pids cgroup and RLIMIT_NPROC)"
    )
    limits.add_argument("--nofile", type=int, default=4096, help="open files (RLIMIT_NOFILE)")
    limits.add_argument(
        "--fsize-mib", type=int, default=1024, help="largest file written (RLIMIT_FSIZE, MiB)"
    )
    limits.add_argument(
        "--tmp-mib", type=int, default=512, help="size of /tmp and of /dev/shm, each (MiB)"
    )
    limits.add_argument(
        "--workspace-mib", type=int, default=1024, help="size of the workspace (MiB, tmpfs)"
    )
    limits.add_argument(
        "--role",
        action="append",
        type=_role,
        default=[],
        metavar="NAME:memory=MIB,sandboxes=N",
        help="a role owner credentials may name (--owner-role): its own memory limit per "
        "sandbox and cap on an owner's live sandboxes, e.g. instructor:memory=4096,"
        "sandboxes=8 (repeatable)",
    )
    host = parser.add_argument_group("admission (per service)")
    host.add_argument("--max-sandboxes", type=int, default=64, help="live sandboxes at most")
    host.add_argument(
        "--max-sandboxes-per-owner",
        type=int,
        default=4,
        help="live sandboxes one owner credential may hold (default 4; 0: no cap); "
        "the service token itself has no such cap",
    )
    host.add_argument(
        "--max-memory-mib",
        type=int,
        default=None,
        help="sum of live sandboxes' memory requests at most (default: the host's RAM "
        "less 2 GiB for the service, Jupyter and the kernels)",
    )
    parser.add_argument(
        "--lease-seconds",
        type=float,
        default=50.0,
        help="destroy a sandbox whose kernel stopped renewing its lease for this long "
        "(an extension kernels opt into; 0 turns leases off; default 50)",
    )
    parser.add_argument(
        "--pool",
        type=int,
        default=int(env.get("MODBOX_LOCAL_POOL") or 0),
        help="sandboxes kept ready with the Python agent already started, so a kernel's "
        "start does not wait for a jail and IPython's import (default: $MODBOX_LOCAL_POOL, "
        "else 0; each counts against the memory budget like a live sandbox)",
    )
    parser.add_argument(
        "--pool-once",
        action="store_true",
        help="fill the pool at startup only, never refill it (the kernel's embedded "
        "service: one sandbox ready for the kernel's first cell)",
    )
    parser.add_argument(
        "--min-ttl",
        type=int,
        default=60,
        help="smallest ttl_seconds accepted (Modbox: 60; lower it only for tests)",
    )
    parser.add_argument(
        "--log-level",
        default=env.get("MODBOX_LOCAL_LOG_LEVEL", "INFO"),
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
    )
    return parser.parse_args(argv)


def _require_isolation() -> bool:
    # The kernel checks the same variable (modbox_kernel/settings.py) and accepts these.
    value = os.environ.get("MODBOX_REQUIRE_ISOLATION", "").strip().lower()
    return value in ("1", "true", "yes", "on")


def _base_url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY on accepted connections only
    # when the listening socket says it is TCP, and without it every response (headers
    # and body are two writes) waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(False)
    return sock


async def _watch_parent(server: uvicorn.Server, parent: int) -> None:
    # Polling getppid() rather than PR_SET_PDEATHSIG: PDEATHSIG follows the parent
    # *thread* that forked us, and a kernel may spawn us from a short-lived thread.
    while not server.should_exit:
        if os.getppid() != parent:
            log.warning("parent process %d is gone; shutting down", parent)
            server.should_exit = True
            return
        await asyncio.sleep(PARENT_POLL_S)


async def _serve(
    server: uvicorn.Server, sock: socket.socket, state: ServiceState, parent: int | None
) -> int:
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    # uvicorn offers no "started" event to await; its own tests poll this flag too.
    while not server.started and not serving.done():  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    if not server.started:
        await serving
        return 1
    # The startup line names where we listen, even when --public-url advertises another
    # address: whoever started us (a test putting a proxy in front) needs the real one.
    listen_url = _base_url(state.config.host, sock.getsockname()[1])
    line = {
        "base_url": listen_url,
        "token": state.config.token,
        "pid": os.getpid(),
        "isolation": state.isolation,
    }
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()
    log.info("listening on %s (isolation: %s; %s)", listen_url, state.isolation, state.limits_note)
    if state.base_url != listen_url:
        log.info("advertising %s in sandbox URLs", state.base_url)
    watcher = asyncio.create_task(_watch_parent(server, parent)) if parent else None
    if parent:
        # The kernel that started us stops us with SIGTERM and waits for our exit, and
        # a restart waits for that kernel: uvicorn's graceful shutdown polls twice at
        # 0.1 s for HTTP connections its one client has already closed. Destroy the
        # sandboxes and go (a request still in flight would find its sandbox gone).
        asyncio.get_running_loop().add_signal_handler(
            signal.SIGTERM, lambda: asyncio.ensure_future(_terminate(state))
        )
    await serving
    if watcher is not None:
        watcher.cancel()
    return 0


async def _terminate(state: ServiceState) -> None:
    """SIGTERM of an embedded service: every sandbox destroyed, state removed, exit."""
    try:
        await state.registry.close()
        for path in state.remove_on_exit:
            await asyncio.to_thread(shutil.rmtree, path, True)
        log.info("terminated; every sandbox destroyed")
    finally:
        logging.shutdown()
        os._exit(0)


def main(argv: list[str] | None = None) -> int:
    parent = os.getppid()
    given = list(sys.argv[1:] if argv is None else argv)
    if given[:1] == ["usage"]:
        return usage.main(given[1:])
    args = parse_args(argv)
    if args.owner_token is not None:
        return _print_owner_token(args)
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    limits = Limits(
        exec_timeout_default=args.exec_timeout,
        output_cap=args.output_cap_mib * MIB,
        memory=args.memory_mib * MIB,
        memory_request=max(1, args.memory_request_mib) * MIB,
        cpus=max(0.0, args.cpus),
        cpu_time=max(0, args.cpu_seconds),
        nproc=args.pids,
        nofile=args.nofile,
        fsize=args.fsize_mib * MIB,
        tmp_size=args.tmp_mib * MIB,
        workspace_size=args.workspace_mib * MIB,
        max_sandboxes=args.max_sandboxes,
        max_sandboxes_per_owner=max(0, args.max_sandboxes_per_owner),
        max_total_memory=(
            args.max_memory_mib * MIB if args.max_memory_mib is not None else _default_budget()
        ),
        ttl_min=max(1, args.min_ttl),
        lease_seconds=max(0.0, args.lease_seconds),
    )
    temporary = args.state_dir is None or args.check
    if temporary:
        for path in reap_stale_state_dirs():
            log.info("removed the state dir %s of a service that is gone", path)
    state_dir = make_state_dir() if temporary else args.state_dir
    assert state_dir is not None
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        config = ServiceConfig(
            host=args.host,
            port=args.port,
            token=args.token or os.environ.get("MODBOX_LOCAL_TOKEN") or secrets.token_urlsafe(32),
            state_dir=state_dir.resolve(),
            isolation=args.isolation,
            require_isolation=_require_isolation(),
            network=args.network,
            limits=limits,
            bwrap=args.bwrap,
            sandbox_uid=args.sandbox_uid,
            sandbox_gid=args.sandbox_uid,
            roles=dict(args.role),
        )
        if args.check:
            return asyncio.run(run_check(config))
        try:
            jail = choose_jail(config)
            sock = _bind(config.host, config.port)
        except (StartupError, OSError) as exc:
            print(f"modbox-local: cannot start: {exc}", file=sys.stderr, flush=True)
            return 2
        _raise_open_files_limit()
        if not become_subreaper():
            log.warning("could not become a child subreaper; ended jails may linger as zombies")
        cgroups = detect_cgroups(limits.memory, limits.nproc, limits.cpus)
        cgroups.reap_stale()
        note = cgroups.description
        if not cgroups.enforces_memory:
            note += f"; RLIMIT_AS {limits.address_space // MIB} MiB per process"
        log.info("state dir %s; resource limits: %s", config.state_dir, note)
        log.info("sandboxes run as %s", jail.privilege.describe())
        registry = Registry(config, jail, cgroups)
        image = builtin_image(datetime.now(timezone.utc))
        if args.pool > 0:
            registry.pool = Pool(registry, image.image, args.pool, refill=not args.pool_once)
        state = ServiceState(
            config=config,
            registry=registry,
            isolation=jail.mode,
            limits_note=note,
            image=image,
            base_url=(args.public_url or "").rstrip("/")
            or _base_url(config.host, sock.getsockname()[1]),
            remove_on_exit=[state_dir] if temporary else [],
        )
        server = uvicorn.Server(
            uvicorn.Config(
                build_app(state),
                loop="asyncio",
                http="h11",
                ws="none",
                lifespan="on",
                access_log=False,
                log_config=None,
                timeout_graceful_shutdown=5,
            )
        )
        return asyncio.run(_serve(server, sock, state, parent if args.exit_with_parent else None))
    finally:
        if temporary:
            shutil.rmtree(state_dir, ignore_errors=True)


def _role(text: str) -> tuple[str, Role]:
    try:
        return parse_role(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _print_owner_token(args: argparse.Namespace) -> int:
    secret = args.token or os.environ.get("MODBOX_LOCAL_TOKEN")
    if not secret:
        print(
            "--owner-token needs the service's token: pass --token or set MODBOX_LOCAL_TOKEN",
            file=sys.stderr,
        )
        return 2
    try:
        print(owners.owner_token(secret, args.owner_token, args.owner_role))
    except ValueError as exc:
        print(f"--owner-token: {exc}", file=sys.stderr)
        return 2
    return 0


def _raise_open_files_limit() -> None:
    """Lift the service's own soft RLIMIT_NOFILE to its hard limit.

    The usual soft limit (1024, from systemd or a login shell) is the whole class's
    budget: every kernel's connections and every sandbox's pipes and fds share it,
    and any student with a terminal on the hub can open a thousand idle connections
    to the port. At the limit the service can accept nothing and start no jail. Each
    sandbox keeps its own ``--nofile`` (prlimit in the jail), whatever this one is.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return
    # Some kernels refuse an infinite soft limit for files; fs.nr_open is the cap.
    target = hard if hard != resource.RLIM_INFINITY else _nr_open()
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as exc:
        log.warning("open files: could not raise the soft limit %d to %d: %s", soft, target, exc)
        return
    log.info("open files: soft limit raised from %d to %d", soft, target)


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1024 * 1024


def _default_budget() -> int:
    """The host's RAM less a 2 GiB reserve (see ``admission``), at least 1 GiB; 64 GiB if
    /proc/meminfo is unreadable."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return max(GIB, int(line.split()[1]) * 1024 - 2 * GIB)
    except (OSError, ValueError, IndexError):
        pass
    return 64 * GIB


if __name__ == "__main__":
    sys.exit(main())
