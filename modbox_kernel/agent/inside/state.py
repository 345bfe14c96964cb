"""The files in the state directory: ``port``, ``token``, ``pid`` and the socket
``agent.sock`` (and ``agent.log``).

``daemon`` writes them once the agent listens; the kernel's bash line reads ``port`` and
``token`` for every request; ``core.Agent.exit_now`` and a restarting ``start`` remove
them. They are 0600 and written atomically, so a reader never sees half a token.
"""

from __future__ import annotations

import os

#: The socket the agent also listens on (``server.UnixServer``); the local service
#: connects to it.
SOCKET_NAME = "agent.sock"
STATE_FILES = ("port", "token", "pid", SOCKET_NAME)
LOG_NAME = "agent.log"


def write_private(path: str, text: str) -> None:
    """Write a 0600 file atomically (readers never see half a token)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def remove_state_files(state_dir: str, pid: int) -> None:
    """Remove the files if agent ``pid`` still owns the directory (a newer one may)."""
    try:
        with open(os.path.join(state_dir, "pid")) as f:
            if int(f.read().strip() or 0) != pid:
                return  # a newer agent owns the dir now
    except (OSError, ValueError):
        return
    unlink_state_files(state_dir)


def unlink_state_files(state_dir: str) -> None:
    for name in STATE_FILES:
        try:
            os.unlink(os.path.join(state_dir, name))
        except OSError:
            pass
