"""A seccomp deny-list for sandboxes, assembled by hand as classic BPF (no libseccomp).

Who calls it: ``jail.BwrapJail`` asks :func:`filter_program` once and hands the bytes to
bwrap through a memfd (``--seccomp FD``) at every sandbox start; ``check`` reports
:func:`describe`. bwrap installs the filter on the sandbox's first process right before
exec'ing it, so the service, bwrap's own setup and the cgroup launcher are not filtered.

Why by hand: the libseccomp Python bindings are not on PyPI in a usable form, and the
filter we want is small. It follows Flatpak's deny-list (``docs/isolation.md``,
"Seccomp") plus the kernel surfaces containers usually close (io_uring, the new mount
API, kexec, modules):

* any syscall of another ABI (i386 via ``int 0x80``, x32) fails with ``ENOSYS``, so a
  32-bit entry point cannot bypass an x86_64 deny-list;
* the denied syscalls below fail with ``EPERM`` (``clone3`` and io_uring with
  ``ENOSYS``, so glibc and libraries fall back to ``clone`` and plain I/O);
* ``clone`` with any namespace flag, ``ioctl(TIOCSTI|TIOCLINUX)`` (compared on the low
  32 bits the kernel uses, CVE-2019-10063), ``socket`` of families other than unix,
  inet, inet6 and netlink, and ``personality`` other than the Linux defaults are denied.

Only x86_64 has a table; elsewhere :func:`filter_program` returns None and ``--check``
says that no filter is in force.
"""

from __future__ import annotations

import errno
import platform
import struct

# struct seccomp_data: int nr; u32 arch; u64 instruction_pointer; u64 args[6].
_NR, _ARCH, _ARG0_LO, _ARG1_LO = 0, 4, 16, 24
_AUDIT_ARCH_X86_64 = 0xC000003E
_X32_SYSCALL_BIT = 0x40000000

_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_JSET_K = 0x45  # BPF_JMP | BPF_JSET | BPF_K
_RET_K = 0x06  # BPF_RET | BPF_K
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000

# x86_64 numbers (arch/x86/entry/syscalls/syscall_64.tbl).
DENIED_EPERM: dict[str, int] = {
    "ptrace": 101,
    "syslog": 103,
    "uselib": 134,
    "vhangup": 153,
    "modify_ldt": 154,
    "pivot_root": 155,
    "_sysctl": 156,
    "chroot": 161,
    "acct": 163,
    "mount": 165,
    "umount2": 166,
    "swapon": 167,
    "swapoff": 168,
    "reboot": 169,
    "iopl": 172,
    "ioperm": 173,
    "init_module": 175,
    "delete_module": 176,
    "quotactl": 179,
    "nfsservctl": 180,
    "lookup_dcookie": 212,
    "mbind": 237,
    "set_mempolicy": 238,
    "get_mempolicy": 239,
    "kexec_load": 246,
    "add_key": 248,
    "request_key": 249,
    "keyctl": 250,
    "migrate_pages": 256,
    "unshare": 272,
    "move_pages": 279,
    "perf_event_open": 298,
    "name_to_handle_at": 303,
    "open_by_handle_at": 304,
    "setns": 308,
    "process_vm_readv": 310,
    "process_vm_writev": 311,
    "kcmp": 312,
    "finit_module": 313,
    "kexec_file_load": 320,
    "bpf": 321,
    "userfaultfd": 323,
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "mount_setattr": 442,
    "quotactl_fd": 443,
    "set_mempolicy_home_node": 450,
}
DENIED_ENOSYS: dict[str, int] = {
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
    "clone3": 435,  # its flags live in memory BPF cannot read; glibc falls back to clone
}
_CLONE, _IOCTL, _SOCKET, _PERSONALITY = 56, 16, 41, 135

# CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET
CLONE_NAMESPACE_FLAGS = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000
CLONE_NAMESPACE_FLAGS |= 0x10000000 | 0x20000000 | 0x40000000
TIOCSTI, TIOCLINUX = 0x5412, 0x541C
# AF_UNIX, AF_INET, AF_INET6, AF_NETLINK (glibc's getaddrinfo and getifaddrs need it).
ALLOWED_SOCKET_FAMILIES = (1, 2, 10, 16)
# PER_LINUX, PER_LINUX32, and 0xffffffff (a query that changes nothing).
ALLOWED_PERSONALITIES = (0x0, 0x8, 0xFFFFFFFF)


class _Assembler:
    """Forward-only BPF with symbolic jump targets, resolved in :meth:`bytes`."""

    def __init__(self) -> None:
        self._items: list[tuple[str, int, str | None]] = []  # (op, k, target)
        self._labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        self._labels[name] = len(self._items)

    def load(self, offset: int) -> None:
        self._items.append(("ld", offset, None))

    def ret(self, value: int) -> None:
        self._items.append(("ret", value, None))

    def jump_if(self, op: str, k: int, target: str) -> None:
        """Jump to ``target`` when the test holds, else fall through."""
        self._items.append((op, k, target))

    def jump_unless_eq(self, k: int, target: str) -> None:
        self._items.append(("jne", k, target))

    def bytes(self) -> bytes:
        codes = {"jeq": _JEQ_K, "jge": _JGE_K, "jset": _JSET_K, "jne": _JEQ_K}
        out = []
        for index, (op, k, target) in enumerate(self._items):
            if op == "ld":
                out.append(struct.pack("<HBBI", _LD_W_ABS, 0, 0, k))
            elif op == "ret":
                out.append(struct.pack("<HBBI", _RET_K, 0, 0, k))
            else:
                assert target is not None
                offset = self._labels[target] - index - 1
                if not 0 <= offset <= 255:
                    raise ValueError(f"jump to {target} out of range ({offset})")
                jt, jf = (0, offset) if op == "jne" else (offset, 0)
                out.append(struct.pack("<HBBI", codes[op], jt, jf, k))
        return b"".join(out)


def _x86_64_program() -> bytes:
    asm = _Assembler()
    asm.load(_ARCH)
    asm.jump_unless_eq(_AUDIT_ARCH_X86_64, "enosys")
    asm.load(_NR)
    asm.jump_if("jge", _X32_SYSCALL_BIT, "enosys")
    for nr in DENIED_EPERM.values():
        asm.jump_if("jeq", nr, "eperm")
    for nr in DENIED_ENOSYS.values():
        asm.jump_if("jeq", nr, "enosys")
    asm.jump_if("jeq", _CLONE, "clone")
    asm.jump_if("jeq", _IOCTL, "ioctl")
    asm.jump_if("jeq", _SOCKET, "socket")
    asm.jump_if("jeq", _PERSONALITY, "personality")
    asm.ret(_RET_ALLOW)

    asm.label("clone")  # clone(flags, ...): flags is args[0]
    asm.load(_ARG0_LO)
    asm.jump_if("jset", CLONE_NAMESPACE_FLAGS, "eperm")
    asm.ret(_RET_ALLOW)

    asm.label("ioctl")  # ioctl(fd, request, ...): the kernel uses request's low 32 bits
    asm.load(_ARG1_LO)
    asm.jump_if("jeq", TIOCSTI, "eperm")
    asm.jump_if("jeq", TIOCLINUX, "eperm")
    asm.ret(_RET_ALLOW)

    asm.label("socket")  # socket(family, ...)
    asm.load(_ARG0_LO)
    for family in ALLOWED_SOCKET_FAMILIES:
        asm.jump_if("jeq", family, "allow")
    asm.ret(_RET_ERRNO | errno.EAFNOSUPPORT)

    asm.label("personality")
    asm.load(_ARG0_LO)
    for persona in ALLOWED_PERSONALITIES:
        asm.jump_if("jeq", persona, "allow")
    asm.ret(_RET_ERRNO | errno.EPERM)

    asm.label("allow")
    asm.ret(_RET_ALLOW)
    asm.label("eperm")
    asm.ret(_RET_ERRNO | errno.EPERM)
    asm.label("enosys")
    asm.ret(_RET_ERRNO | errno.ENOSYS)
    return asm.bytes()


def filter_program() -> bytes | None:
    """The cBPF program (``struct sock_filter[]`` bytes) for this machine, or None."""
    if platform.machine() != "x86_64":
        return None
    return _x86_64_program()


def describe() -> str:
    if filter_program() is None:
        return f"no seccomp filter for {platform.machine()} (only x86_64 has one)"
    return (
        f"x86_64 deny-list: {len(DENIED_EPERM) + len(DENIED_ENOSYS)} syscalls, namespace "
        "flags of clone, TIOCSTI/TIOCLINUX, exotic socket families; other ABIs refused"
    )
