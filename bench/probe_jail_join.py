"""Whether a warm process can hand a child to a bubblewrap jail (a probe, not a feature).

``python bench/probe_jail_join.py`` (as root, bubblewrap and setpriv installed) starts a
jail the way the local service's does in shape (unprivileged uid, every namespace
unshared, capabilities dropped), then, as the same unprivileged uid, a process that
forks a child which enters the jail: its namespaces, its root, its uid, then the
service's own seccomp filter (``modbox_kernel.local.seccomp``) under ``no_new_privs``.
The child reports what it sees; the probe exits 0 only when the child is inside (its
own PID namespace, the jail's root and no host path, only loopback, no capability
left, and the filter refusing ``unshare``).

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

import ctypes
import fcntl
import json
import os
import resource
import shutil
import subprocess
import sys
import time

NOBODY = 65534
NS_GET_PARENT = 0xB702
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
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
JAIL_ARGS = (
    *("--unshare-all", "--die-with-parent", "--cap-drop", "ALL"),
    *("--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib"),
    *("--symlink", "usr/lib64", "/lib64", "--symlink", "usr/bin", "/bin"),
    *("--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"),
)


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
    import asyncio  # noqa: F401  (stands in for the warm imports)

    libc = ctypes.CDLL(None, use_errno=True)
    fds = {name: os.open(f"/proc/{target}/ns/{name}", os.O_RDONLY) for name in CLONE}
    fds["outer"] = fcntl.ioctl(fds["user"], NS_GET_PARENT)
    root = os.open(f"/proc/{target}/root", os.O_RDONLY)
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
                status = dict(
                    line.split(":\t", 1) for line in open("/proc/self/status") if ":\t" in line
                )
                with open("/proc/net/dev") as dev:
                    interfaces = [line.split(":")[0].strip() for line in dev.readlines()[2:]]
                seen = {
                    "pid": os.getpid(),
                    "uid": os.getuid(),
                    "root": sorted(os.listdir("/")),
                    "host_path_visible": os.path.exists(os.path.dirname(os.path.abspath(__file__))),
                    "interfaces": interfaces,
                    "cap_eff": status["CapEff"].strip(),
                    "no_new_privs": status["NoNewPrivs"].strip(),
                    "seccomp_filters": status.get("Seccomp_filters", "?").strip(),
                    "unshare_refused": libc.unshare(CLONE["user"]) != 0,
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
        and seen.get("pid", NOBODY) < 10
        and seen.get("uid") == NOBODY
        and seen.get("host_path_visible") is False
        and seen.get("interfaces") == ["lo"]
        and int(seen.get("cap_eff", "1"), 16) == 0
        and seen.get("no_new_privs") == "1"
        and seen.get("unshare_refused") is True
    )
    print("the child is inside the jail" if inside else "the child did NOT get inside")
    return 0 if inside else 1


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--join":
        return join(int(sys.argv[2]), bytes.fromhex(sys.argv[3]))
    bwrap, setpriv = shutil.which("bwrap"), shutil.which("setpriv")
    if os.geteuid() != 0 or not bwrap or not setpriv:
        print("needs root, bwrap and setpriv", file=sys.stderr)
        return 2
    drop = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]
    here = os.path.dirname(os.path.abspath(__file__))
    jail = subprocess.Popen([*drop, bwrap, *JAIL_ARGS, "--", "/bin/sleep", "60"])
    try:
        target = None
        for _ in range(100):  # bwrap's own processes come first, then sleep
            found = subprocess.run(
                ["pgrep", "-u", str(NOBODY), "-x", "sleep", "-P", ",".join(_descendants(jail.pid))],
                capture_output=True,
                text=True,
            ).stdout.split()
            if found:
                target = int(found[0])
                break
            time.sleep(0.05)
        if target is None:
            print("the jail did not start", file=sys.stderr)
            return 2
        # Debian's /usr/bin/python3: the uid cannot reach an interpreter under /root.
        python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
        script = os.path.join(here, os.path.basename(__file__))
        program = _service_filter().hex()
        return subprocess.run([*drop, python, script, "--join", str(target), program]).returncode
    finally:
        jail.kill()
        jail.wait()


def _service_filter() -> bytes:
    """The local service's seccomp program (empty where it has none: not x86_64)."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from modbox_kernel.local.seccomp import filter_program

    return filter_program() or b""


def _descendants(pid: int) -> list[str]:
    """``pid`` and its descendants (bwrap forks before the jail's command runs)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [str(pid), *[d for child in out for d in _descendants(int(child))]]


if __name__ == "__main__":
    sys.exit(main())
