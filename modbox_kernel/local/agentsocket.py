"""The agent route's own way into a sandbox: the agent's socket in its state directory.

Who calls it: ``JailCalls.ask_agent`` (the ``agent`` route) tries :func:`find` and
:func:`ask` first. When the agent has no socket there (an agent older than it, or one
that could not bind it), :class:`NoSocket` sends the request the older way: through
the jail's supervisor, which connects to the agent's TCP port inside the jail. The
direct way saves a thread start and a TCP connection in the jail on every request: a
trivial request's round trip through the route went from 2.2 to 1.8 ms on the
development VM, the ping that ``JailCalls`` sends the supervisor after each answer
included.

Why it is safe, although the sandbox controls the whole path (as in ``files.py``):

* the walk starts from the workspace's directory fd and opens every component with
  ``O_PATH | O_NOFOLLOW``, the socket too; the service then connects to
  ``/proc/self/fd/<that fd>``, so it reaches exactly the inode it checked, never a
  host socket a planted symlink (or a rename in between) points at;
* the socket must be a socket of the sandbox's own user, and the token file a regular
  file of one link and a few bytes, read under the sandbox's filesystem ids
  (:func:`files.acting_as`): nothing of the host's can be read into a request that goes
  to the sandbox;
* the answer is bounded by ``cap`` and the request by its timeout, as the supervisor
  bounds them.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat

from .files import Workspace, acting_as

#: The socket and the token file in the agent's state directory (the agent writes both,
#: ``agent/inside/server.py`` and ``state.py``).
SOCKET_NAME = "agent.sock"
TOKEN_NAME = "token"
TOKEN_MAX_BYTES = 256
_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


class NoSocket(Exception):
    """The state directory holds no usable socket: relay through the supervisor."""


def _find(ws: Workspace, parts: list[str]) -> tuple[int, str]:
    """(an O_PATH fd of the socket, the token); blocking but quick (a few syscalls)."""
    dir_fd = os.open(".", _PATH_FLAGS | os.O_DIRECTORY, dir_fd=ws.root_fd)
    try:
        for name in parts:
            nxt = os.open(name, _PATH_FLAGS | os.O_DIRECTORY, dir_fd=dir_fd)
            os.close(dir_fd)
            dir_fd = nxt
        sock_fd = os.open(SOCKET_NAME, _PATH_FLAGS, dir_fd=dir_fd)
        try:
            st = os.fstat(sock_fd)
            if not stat.S_ISSOCK(st.st_mode) or (ws.owner is not None and st.st_uid != ws.owner[0]):
                raise NoSocket(f"{SOCKET_NAME} is not the sandbox's socket")
            return sock_fd, _read_token(dir_fd)
        except BaseException:
            os.close(sock_fd)
            raise
    finally:
        os.close(dir_fd)


def _read_token(dir_fd: int) -> str:
    fd = os.open(
        TOKEN_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
    )
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_size > TOKEN_MAX_BYTES:
            raise NoSocket(f"{TOKEN_NAME} is not the agent's token file")
        token = os.read(fd, TOKEN_MAX_BYTES + 1).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    if not token or any(c.isspace() for c in token):
        raise NoSocket(f"{TOKEN_NAME} holds no token")
    return token


def find(ws: Workspace, parts: list[str]) -> tuple[int, str]:
    """The agent's socket in the state directory ``parts`` of ``ws``: (an ``O_PATH`` fd
    of it, for :func:`ask`, which closes it; the token). Quick and synchronous, so the
    caller can close its workspace fd before the request waits.

    Raises :class:`NoSocket` when there is no socket to try.
    """
    try:
        with acting_as(ws.owner):
            return _find(ws, parts)
    except OSError as exc:  # none there, or ELOOP (a planted link): not the agent's own
        raise NoSocket(str(exc)) from None


async def ask(sock_fd: int, token: str, body: str, timeout: float, cap: int) -> dict:
    """One agent request through the socket :func:`find` gave (``sock_fd`` is closed
    here), answered as the supervisor's relay of the ``agent`` op reads
    (``jailprocess``): ``reached``, then the agent's line as ``payload`` (bytes) and
    ``timedOut``, or ``error``."""
    loop = asyncio.get_running_loop()
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
    except BaseException:
        os.close(sock_fd)
        raise
    with sock:
        try:
            try:
                await loop.sock_connect(sock, f"/proc/self/fd/{sock_fd}")
            finally:
                os.close(sock_fd)
        except OSError as exc:  # a socket left by an agent that died
            return {"reached": False, "error": f"no agent listens on {SOCKET_NAME}: {exc}"}
        try:
            answer = await asyncio.wait_for(
                _exchange(loop, sock, f"{token} {body}\n", cap), timeout
            )
        except asyncio.TimeoutError:
            return {"reached": True, "payload": b"", "timedOut": True}
        except OSError:
            answer = b""  # the agent died mid-answer: an empty answer says so
        if answer is None:
            return {"reached": True, "error": f"the answer is over {cap} bytes"}
        return {"reached": True, "payload": answer, "timedOut": False}


async def _exchange(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, line: str, cap: int
) -> bytes | None:
    """Send ``line``, read to the end; None when the answer grows beyond ``cap``."""
    await loop.sock_sendall(sock, line.encode("ascii", "replace"))
    chunks: list[bytes] = []
    size = 0
    while data := await loop.sock_recv(sock, 1 << 18):
        size += len(data)
        if size > cap:
            return None
        chunks.append(data)
    return b"".join(chunks)
