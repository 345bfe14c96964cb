"""The line of creates waiting for capacity: first come, first served.

Who calls it: ``registry.Registry.create`` asks :meth:`WaitLine.turn` before admission
for every create that carries an ``Idempotency-Key`` (the kernel keeps one key while it
waits, so the key is its place in line). At capacity the create is refused with a 429
that says where it stands; when capacity frees, only the head of the line is let
through, so a newcomer cannot overtake a student who has been waiting. A place is
given up when its holder stops asking for :data:`PATIENCE_S` seconds (a kernel that was
shut down while waiting). Creates without a key are served only while nobody waits.

An extension of the local service: the Modbox API documents 429 but no line, so the
kernel reads the place only from the error's ``details`` and works without it.
"""

from __future__ import annotations

import time
from collections import OrderedDict

#: A waiting key that has not asked again for this long has left the line.
PATIENCE_S = 5.0


class WaitLine:
    """Keys waiting for a sandbox, oldest first, with when each last asked."""

    def __init__(self) -> None:
        self._waiting: OrderedDict[str, float] = OrderedDict()

    def _forget_the_gone(self, now: float) -> None:
        for key, seen in list(self._waiting.items()):
            if now - seen > PATIENCE_S:
                del self._waiting[key]

    def ahead_of(self, key: str | None) -> int:
        """How many waiting creates come before ``key`` (all of them for a keyless one)."""
        now = time.monotonic()
        self._forget_the_gone(now)
        if key is None or key not in self._waiting:
            return len(self._waiting)
        self._waiting[key] = now
        return list(self._waiting).index(key)

    def join(self, key: str | None) -> int:
        """Take (or keep) a place; returns it, 1 for the head. Keyless: no place."""
        if key is None:
            return 0
        now = time.monotonic()
        self._waiting.setdefault(key, now)
        self._waiting[key] = now
        return list(self._waiting).index(key) + 1

    def leave(self, key: str | None) -> None:
        """The create was admitted (or failed for another reason)."""
        if key is not None:
            self._waiting.pop(key, None)

    def __len__(self) -> int:
        self._forget_the_gone(time.monotonic())
        return len(self._waiting)
