"""Files that come back: what cells write in the sandbox's working folder reaches the
notebook's folder on the host, as a local kernel's writes would.

Who calls what, and when: the session makes one :class:`FileSync` and, each time a
sandbox is ready, calls :meth:`FileSync.attach` with its agent channel and where the
folder was unpacked. After every cell, ``execution`` hands the ``files`` field of the
cell's ``done`` event (the agent's list of files the cell created or changed,
``agent/inside/workfiles.py``) to :meth:`FileSync.after_cell`, before the execute
reply: when a cell is reported done, its files are on the host. A cell that wrote
nothing has no ``files`` field and costs no request. At shutdown the session calls
:meth:`FileSync.final` (files written by threads after the last cell, or every file
when MODBOX_SYNC=shutdown). ``%modbox pull`` and ``push`` (``magic.py``) use
:meth:`pull` and :meth:`push`.

Bounds: per file (MODBOX_SYNC_FILE_LIMIT), per cell (MODBOX_SYNC_LIMIT) and
:data:`MAX_FILES` files per cell; what does not fit is named in one notice with the
setting to change. The host side checks every name and writes without following
links (``hostfiles``); files that cannot come back get one notice line per kind.
Deleting a file in the sandbox never deletes it on the host.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import posixpath
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .channel import AgentChannel
from .errors import ModboxError
from .foldercopy import Placed, enter_folder
from .hostfiles import Conflict, HostFolder, Incoming, Refused

log = logging.getLogger(__name__)

#: Files brought back after one cell at most; the rest are named in a notice.
MAX_FILES = 1000
#: Bytes asked for per ``read`` request (the agent's answers carry at most 2 MiB).
READ_CHUNK = 2 * 1024 * 1024
#: How long shutdown waits for the last files: jupyter_client kills a kernel that has
#: not exited 5 s after its shutdown request.
FINAL_SYNC_WAIT = 3.0
#: How many names one notice lists before "and N more".
NAMES_SHOWN = 5
MIB = 1024 * 1024


@dataclass
class SyncSettings:
    """MODBOX_SYNC and its limits, resolved by the kernel."""

    mode: str = "cell"  # cell | shutdown | never
    file_limit: int = 64 * MIB
    cell_limit: int = 256 * MIB


@dataclass
class Outcome:
    """What one transfer did: counts for ``%modbox``, sentences for the user."""

    files: int = 0
    size: int = 0
    notices: list[str] = field(default_factory=list)


def size_text(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:NAMES_SHOWN])
    more = len(names) - NAMES_SHOWN
    return shown + (f" and {more} more" if more > 0 else "")


class FileSync:
    """The host side of one kernel's working folder (one sandbox at a time)."""

    def __init__(self, settings: SyncSettings) -> None:
        self.settings = settings
        self.host: HostFolder | None = None
        self.channel: AgentChannel | None = None
        self.sandbox_root = ""  # the working folder's root in the sandbox
        self.sandbox_cwd = ""  # where cells run (the notebook's place below the root)
        self.synced = Outcome()  # everything brought back this session, for %modbox
        self.placed: Placed | None = None
        self.last_sync: float | None = None

    async def enter(self, channel: AgentChannel, placed: Placed) -> None:
        """A new sandbox's agent: move it into its working folder; from now on files
        come back from there to the host folder it was copied from."""
        await enter_folder(channel, placed, track=self.settings.mode == "cell")
        self.channel = channel
        self.sandbox_root, self.sandbox_cwd = placed.root, placed.cwd
        self.host = HostFolder(placed.host_root, placed.copied) if placed.host_root else None
        self.placed = placed

    async def reenter(self, channel: AgentChannel) -> None:
        """A restarted agent (same sandbox, same files): into the working folder again."""
        if self.placed is not None:
            await enter_folder(channel, self.placed, track=self.settings.mode == "cell")

    @property
    def active(self) -> bool:
        return self.host is not None and self.settings.mode != "never"

    async def after_cell(self, files: Any) -> list[str]:
        """Bring back what a cell changed (its done event's ``files``); the notices."""
        if not self.active or self.settings.mode != "cell" or not isinstance(files, dict):
            return []
        try:
            return await self._bring_changes(files)
        except Exception as exc:  # the sandbox went away meanwhile, say: one sentence
            log.warning("files could not be copied back: %s", exc)
            return [f"Modbox: this cell's files could not be copied back to the host ({exc})."]

    async def final(self) -> None:
        """At shutdown (``SandboxSession.close``): bring back what changed since the last
        look (everything, with MODBOX_SYNC=shutdown), so a batch run ends with its files
        in place; within :data:`FINAL_SYNC_WAIT`; nobody is left to read notices: logged."""
        try:
            notices = await asyncio.wait_for(self._final(), FINAL_SYNC_WAIT)
        except Exception as exc:
            log.warning("files could not be copied back at shutdown: %s", exc)
            return
        for notice in notices:
            log.warning("%s", notice)

    async def _final(self) -> list[str]:
        if not self.active or self.channel is None:
            return []
        try:
            answer = await self.channel.request({"op": "files"}, read_timeout=10.0)
        except Exception as exc:  # shutting down: log it, and go on with the teardown
            log.warning("could not ask the sandbox for its changed files: %s", exc)
            return []
        files = answer.get("files")
        try:
            return await self._bring_changes(files) if isinstance(files, dict) else []
        except Exception as exc:
            log.warning("files could not be copied back at shutdown: %s", exc)
            return []

    async def _bring_changes(self, files: dict[str, Any]) -> list[str]:
        notices: list[str] = []
        if files.get("overflow"):
            notices.append(
                f"Modbox: the working folder holds more than {files['overflow']} files and "
                "folders, so files are no longer copied back to the host after each cell; "
                "copy what you need with %modbox pull PATH."
            )
        skipped = [s for s in files.get("skipped") or [] if isinstance(s, dict)]
        links = [str(s.get("path")) for s in skipped if s.get("why") == "link"]
        special = [str(s.get("path")) for s in skipped if s.get("why") != "link"]
        if links:
            notices.append(
                f"Modbox: not copied back, because links are never copied to the host: "
                f"{_names(links)}."
            )
        if special:
            notices.append(
                f"Modbox: not copied back, because they are not regular files (FIFOs, "
                f"sockets or devices): {_names(special)}."
            )
        items = []
        for entry in files.get("changed") or []:
            if isinstance(entry, dict) and isinstance(entry.get("path"), str):
                size = entry.get("size")
                # A negative size from a lying agent must not enlarge the cell's budget.
                items.append((entry["path"], max(0, size) if isinstance(size, int) else 0))
        outcome = await self._bring(items)
        return notices + outcome.notices

    async def _bring(self, items: list[tuple[str, int]]) -> Outcome:
        """Copy changed files (names relative to the root) within the caps."""
        assert self.host is not None
        limits = self.settings
        outcome = Outcome()
        too_big, over_cell, refused, conflicts = [], [], [], []
        budget = limits.cell_limit
        chosen: list[tuple[str, int]] = []
        for name, size in items:
            if limits.file_limit and size > limits.file_limit:
                too_big.append(f"{name} ({size_text(size)})")
            elif (limits.cell_limit and size > budget) or len(chosen) >= MAX_FILES:
                over_cell.append(name)
            else:
                budget -= size
                chosen.append((name, size))
        for name, size in chosen:
            try:
                incoming = self.host.open_new(name)
            except Refused as exc:
                refused.append(f"{name} ({exc})")
                continue
            source = posixpath.join(self.sandbox_root, name)
            try:
                # Never more than the size the agent reported (and the caps admitted).
                await self._receive(source, incoming, size)
                incoming.commit()
            except Conflict:
                conflicts.append(name)
                continue
            except (Refused, ModboxError) as exc:
                incoming.close()
                refused.append(f"{name} ({exc})")
                continue
            except BaseException:
                incoming.close()
                raise
            outcome.files += 1
            outcome.size += incoming.written
        self._count(outcome)
        if too_big:
            outcome.notices.append(
                f"Modbox: not copied back, because each is over MODBOX_SYNC_FILE_LIMIT "
                f"({size_text(limits.file_limit)}): {_names(too_big)}; copy one with "
                "%modbox pull PATH, or raise the limit in the kernel's environment."
            )
        if over_cell:
            outcome.notices.append(
                f"Modbox: not copied back, because this cell's files are over "
                f"MODBOX_SYNC_LIMIT ({size_text(limits.cell_limit)}) or {MAX_FILES} files: "
                f"{_names(over_cell)}; copy them with %modbox pull PATH."
            )
        if conflicts:
            outcome.notices.append(
                "Modbox: not copied back, because the host's copy changed since the sandbox "
                f"got it (the host's is kept): {_names(conflicts)}; to replace the host's "
                "copy with the sandbox's, run %modbox pull PATH."
            )
        if refused:
            outcome.notices.append(f"Modbox: not copied back: {_names(refused)}.")
        return outcome

    def _count(self, outcome: Outcome) -> None:
        if outcome.files:
            self.synced.files += outcome.files
            self.synced.size += outcome.size
            self.last_sync = time.time()

    async def _receive(self, source: str, incoming: Incoming, cap: int) -> None:
        """Read ``source`` in chunks into ``incoming``; more than ``cap`` bytes (the size
        the agent reported, which the caps admitted) is refused, whatever it says."""
        assert self.channel is not None
        offset = 0
        while True:
            request: dict[str, Any] = {
                "op": "read",
                "files": [{"path": source, "offset": offset}],
                "limit": READ_CHUNK,
            }
            answer = await self.channel.request(request, read_timeout=60.0)
            chunks = answer.get("chunks") or []
            chunk = chunks[0] if chunks and isinstance(chunks[0], dict) else {}
            if "error" in chunk or "data" not in chunk:
                raise Refused(f"the sandbox could not read it: {chunk.get('error', 'no answer')}")
            data = base64.b64decode(str(chunk["data"]))
            if offset + len(data) > cap:
                raise Refused(f"it grew past {size_text(cap)} while it was copied")
            incoming.write(data)
            offset += len(data)
            if chunk.get("eof") or not data:
                return

    # -- %modbox pull / push -----------------------------------------------------------

    async def pull(self, path: str, dest: Callable[[str, str], str]) -> Outcome:
        """Copy ``path`` (a sandbox file or folder) to the host, replacing host files.

        ``dest(listed_path, kind)`` maps the sandbox's absolute path to a name relative
        to the host root (``magic.py`` decides; Refused when it falls outside).
        """
        if self.channel is None or self.host is None:
            raise ModboxError("there is no notebook folder on the host to copy files into")
        answer = await self.channel.request({"op": "list", "path": path}, read_timeout=30.0)
        base = str(answer.get("path", path))
        kind = str(answer.get("kind", "file"))
        target = dest(base, kind)
        outcome = Outcome()
        failed: list[str] = []
        for entry in answer.get("files") or []:
            if not isinstance(entry, dict):
                continue
            rel = str(entry.get("path", ""))
            name = f"{target}/{rel}" if rel else target
            source = posixpath.join(base, rel) if rel else base
            size = entry.get("size")
            try:
                incoming = self.host.open_new(name, hidden=True)
            except Refused as exc:
                failed.append(f"{name} ({exc})")
                continue
            try:
                await self._receive(source, incoming, size if isinstance(size, int) else 0)
                incoming.commit(replace=True)  # an explicit pull replaces the host's copy
            except (Refused, ModboxError) as exc:
                incoming.close()
                failed.append(f"{name} ({exc})")
                continue
            outcome.files += 1
            outcome.size += incoming.written
        self._count(outcome)
        if answer.get("more"):
            outcome.notices.append(f"only the first {outcome.files} files of {path} were copied")
        if failed:
            outcome.notices.append(f"not copied: {_names(failed)}")
        return outcome

    async def push(self, files: list[tuple[str, str]]) -> Outcome:
        """Write host files into the sandbox: [(host path, sandbox path)]."""
        if self.channel is None:
            raise ModboxError("there is no sandbox to copy files into")
        outcome = Outcome()
        for host_path, target in files:
            f = await asyncio.to_thread(open, host_path, "rb")
            try:
                offset = 0
                while True:
                    data = await asyncio.to_thread(f.read, READ_CHUNK)
                    if offset and not data:
                        break
                    request = {
                        "op": "write",
                        "path": target,
                        "offset": offset,
                        "data": base64.b64encode(data).decode("ascii"),
                    }
                    await self.channel.request(request, read_timeout=60.0)
                    offset += len(data)
                    if not data:
                        break
            finally:
                f.close()
            outcome.files += 1
            outcome.size += offset
        return outcome
