"""What a cell must tell the user before its own output, each once.

Who calls what, and when: the session (``session.py``) owns one :class:`Notices` and
records into it as things happen (a lost sandbox, a folder that was not copied); the
kernel takes them through ``SandboxSession.take_notices`` before each cell runs and
prints each as a line on the cell's stderr. The TTL warning is worked out at that
moment, from when the current sandbox was made.
"""

from __future__ import annotations

import time


class Notices:
    """The sentences waiting for the next cell."""

    def __init__(self, ttl_seconds: int) -> None:
        self._ttl = ttl_seconds
        self.lost: str | None = None  # why the last sandbox was lost
        self.copy: str | None = None  # why the notebook's folder was not copied
        self._ttl_warned: str | None = None  # the sandbox already warned about

    def take(self, sandbox_id: str | None, created: float) -> list[str]:
        """The notices for a cell about to run in ``sandbox_id`` (made at ``created``)."""
        notices = []
        warning = self._expiry_warning(sandbox_id, created)
        if warning:
            notices.append(warning)
        if self.copy:
            notices.append(f"Modbox: {self.copy}.")
            self.copy = None
        if self.lost:
            notices.append(
                f"Modbox: {self.lost}; this cell runs in a fresh sandbox, "
                "so earlier variables, and files not copied back to the notebook's folder, "
                "are gone."
            )
            self.lost = None
        return notices

    def _expiry_warning(self, sandbox_id: str | None, created: float) -> str | None:
        """A one-time sentence when the sandbox's TTL is about to run out, else None."""
        if sandbox_id is None or self._ttl_warned == sandbox_id:
            return None
        ttl = self._ttl
        left = ttl - (time.monotonic() - created)
        if left > max(60.0, 0.1 * ttl):
            return None
        self._ttl_warned = sandbox_id
        when = f"{max(0, int(left))} s" if left < 120 else f"{int(left // 60)} min"
        return (
            f"Modbox: this sandbox reaches its time limit (TTL {ttl} s) in about {when}; "
            "after that the next cell starts in a fresh sandbox without the current variables "
            "and the files not copied back to the notebook's folder. Raise "
            "MODBOX_TTL_SECONDS for longer sessions."
        )
