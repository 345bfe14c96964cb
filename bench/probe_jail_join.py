"""Whether a warm process can hand a child to a sandbox's jail (a probe, not a feature).

``python bench/probe_jail_join.py`` (as root, with bubblewrap: the service then drops
each jail to an unprivileged uid) starts the local service (``EmbeddedService``),
creates one sandbox and finds its supervisor. Then a process of the jail's uid forks a
child which enters that jail: its namespaces, its root, then the service's own seccomp
filter (``modbox_kernel.local.seccomp``) under ``no_new_privs``. The child reports
what it sees; the probe exits 0 only when the child is inside: in every namespace the
supervisor is in, at the supervisor's uid, seeing no host path, with no capability
left and the filter refusing ``get_mempolicy``.

It answers the feasibility question under ``docs/classroom.md`` ("Arrivals"): the
service could start each sandbox's agent by forking a warm process instead of starting
a fresh interpreter in every jail. The probe leaves out what a real hand-over would
also need (the cgroup, the rlimits, the agent's state files).

What it found on bubblewrap 0.8: bwrap nests a second user namespace inside the one
that owns the jail's other namespaces, so the child joins the outer one first (where it
may enter the mount, network, IPC, UTS and PID namespaces), then the inner one, then
drops the capabilities that joining a user namespace grants.
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import json
import os
import resource
import secrets
import subprocess
import sys

NS_GET_PARENT = 0xB702
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
GET_MEMPOLICY = 239  # x86_64, the one ABI the service's filter is written for
CLONE = {
    "user": 0x10000000,
    "mnt": 0x00020000,
    "net": 0x40000000,
    "ipc": 0x08000000,
    "uts": 0x04000000,
    "pid": 0x20000000,
}
# The jail's namespaces in the order they can be entered: the outer user namespace
# owns the others; the inner one (the jail's own) comes last.
ORDER = ("outer", "mnt", "net", "ipc", "uts", "pid", "user")


def _drop_capabilities(libc: ctypes.CDLL) -> None:
    """Empty the bounding, effective, permitted and inheritable sets (capset v3)."""
    for cap in range(64):
        libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [(n, ctypes.c_uint32) for n in ("effective", "permitted", "inheritable")]

    header = Header(0x20080522, 0)
    data = (Data * 2)()
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def _load_filter(libc: ctypes.CDLL, program: bytes) -> None:
    """``no_new_privs``, then the service's seccomp program on top of bwrap's."""
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "no_new_privs")

    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]

    prog = Fprog(len(program) // 8, program)  # struct sock_filter is 8 bytes
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "seccomp")


def join(target: int, program: bytes) -> int:
    """Run as the jail's uid: fork a child into ``target``'s jail; 0 if it got inside."""
    import email.parser  # noqa: F401  (stands in for the warm imports)

    libc = ctypes.CDLL(None, use_errno=True)
    fds = {name: os.open(f"/proc/{target}/ns/{name}", os.O_RDONLY) for name in CLONE}
    fds["outer"] = fcntl.ioctl(fds["user"], NS_GET_PARENT)
    root = os.open(f"/proc/{target}/root", os.O_RDONLY)
    # What "inside" means: the supervisor's namespaces and uid, read before the fork.
    expected = {name: os.readlink(f"/proc/{target}/ns/{name}") for name in CLONE}
    expected_uid = _status(target)["Uid"].split()[1]
    read, write = os.pipe()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            for name in ORDER:
                kind = CLONE["user" if name == "outer" else name]
                if libc.setns(fds[name], kind) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {name}")
            os.fchdir(root)
            os.chroot(".")
            os.chdir("/")
            _drop_capabilities(libc)
            if program:
                _load_filter(libc, program)
            inner = os.fork()  # the PID namespace applies to children only
            if inner == 0:
                status = _status("self")
                seen = {
                    "pid": os.getpid(),
                    "uid": str(os.getuid()),
                    "namespaces": {name: os.readlink(f"/proc/self/ns/{name}") for name in CLONE},
                    "root": sorted(os.listdir("/")),
                    "host_path_visible": os.path.exists(os.path.dirname(os.path.abspath(__file__))),
                    "cap_eff": status["CapEff"],
                    "no_new_privs": status["NoNewPrivs"],
                    "seccomp_filters": status.get("Seccomp_filters", "?"),
                    # Allowed to any process but refused by the service's filter.
                    "get_mempolicy_refused": libc.syscall(GET_MEMPOLICY, None, None, 0, None, 0)
                    != 0,
                }
                os.write(write, json.dumps(seen).encode())
                os._exit(0)
            os._exit(os.waitstatus_to_exitcode(os.waitpid(inner, 0)[1]))
        except BaseException as exc:  # report, never return into the parent's code
            os.write(write, json.dumps({"error": str(exc)}).encode())
            os._exit(1)
    os.close(write)
    os.waitpid(pid, 0)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    with os.fdopen(read) as answer:
        seen = json.loads(answer.read() or "{}")
    # Fork, entering, the report: both children, reaped in turn.
    seen["child_cpu_ms"] = round(
        1000 * (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime), 1
    )
    print(json.dumps(seen, indent=1))
    inside = (
        "error" not in seen
        and seen.get("namespaces") == expected
        and seen.get("uid") == expected_uid
        and seen.get("host_path_visible") is False
        and int(seen.get("cap_eff", "1"), 16) == 0
        and seen.get("no_new_privs") == "1"
        and seen.get("get_mempolicy_refused") is True
    )
    print("the child is inside the jail" if inside else "the child did NOT get inside")
    return 0 if inside else 1


def _status(pid: int | str) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as status:
        return {k: v.strip() for k, _, v in (line.partition(":\t") for line in status) if v}


def _jailed(sandbox_id: str) -> int | None:
    """The sandbox's supervisor: its process in a PID namespace other than ours."""
    marker = f"MODBOX_SANDBOX_ID={sandbox_id}".encode()
    ours = os.readlink("/proc/self/ns/pid")
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/environ", "rb") as environ:
                if marker not in environ.read().split(b"\0"):
                    continue
            if os.readlink(f"/proc/{name}/ns/pid") != ours:
                return int(name)
        except (OSError, ValueError):
            continue
    return None


def _join_command(target: int, program: str) -> list[str]:
    """This script's ``--join`` as the uid and gid of the jail's ``target``."""
    status = _status(target)
    uid, gid = status["Uid"].split()[1], status["Gid"].split()[1]
    drop = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]
    # Debian's python3: the jail's uid may not reach the service's interpreter (under
    # /root), which the service stages for the jails alone.
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    return [*drop, python, os.path.abspath(__file__), "--join", str(target), program]


async def probe() -> int:
    from modbox_kernel.api import ModboxClient
    from modbox_kernel.embedded import EmbeddedService
    from modbox_kernel.local.seccomp import filter_program

    service = EmbeddedService()
    await service.start()
    try:
        if service.isolation != "bwrap" or os.geteuid() != 0:
            print(f"needs root and bwrap (isolation: {service.isolation})", file=sys.stderr)
            return 2
        async with ModboxClient(service.base_url, service.token) as client:
            created = await client.create_sandbox(
                task_id=f"probe-join-{secrets.token_hex(4)}",
                ttl_seconds=300,
                env_vars={"SANDBOX_API_KEY": secrets.token_urlsafe(24)},
            )
            try:
                await client.wait_until_running(created.id, timeout=60)
                target = _jailed(created.id)
                if target is None:
                    print("found no process of the sandbox in its own jail", file=sys.stderr)
                    return 2
                child = _join_command(target, (filter_program() or b"").hex())
                return (await asyncio.to_thread(subprocess.run, child)).returncode
            finally:
                await client.destroy_sandbox(created.id)
    finally:
        await service.stop()


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--join":
        return join(int(sys.argv[2]), bytes.fromhex(sys.argv[3]))
    return asyncio.run(probe())


if __name__ == "__main__":
    sys.exit(main())
