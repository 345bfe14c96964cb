"""``%modbox``: the kernel's own line magic, run on the host, never in the sandbox.

Who calls what, and when: ``ModboxKernel.do_execute`` calls :func:`parse` on every
cell. A cell made only of ``%modbox`` lines (blank lines and comments aside) is run
by :meth:`ModboxMagic.run` instead of being sent to the sandbox; mixed with code, the
sandbox's own ``%modbox`` (``agent/inside/kernelmagics.py``) says to give it a cell of
its own. ``do_complete`` and ``do_inspect`` ask :meth:`ModboxMagic.complete` and
:func:`help_for` first, so completion and ``%modbox?`` work too.

Paths: ``pull`` names sandbox paths (relative to where cells run) and copies them to
the host at the same place below the copied folder; a path outside it goes to the
notebook's folder under its own name. ``push`` is the other way round. ``--to DIR``
chooses the destination folder; on the host it must stay inside the copied folder.
"""

from __future__ import annotations

import asyncio
import os
import posixpath
import re
import shlex
import time
from typing import Any

from .errors import ModboxError
from .filesync import Outcome, size_text
from .hostfiles import Refused, safe_parts
from .relay import OutputRelay
from .session import SandboxSession

COMMANDS = ("status", "pull", "push", "help")
#: Files one ``push`` of a folder sends at most.
MAX_PUSHED = 5000

HELP = """\
%modbox                 the sandbox's status: backend, id, image, Python, uptime, TTL
                        left, memory and CPU used, files copied back
%modbox pull PATH...    copy files or folders from the sandbox to the notebook's folder
                        (PATH is a sandbox path, relative to where cells run). What is
                        inside the copied folder goes to the same place on the host,
                        anything else to the notebook's folder under its own name. A
                        pull replaces the host's copy and ignores the size limits.
%modbox push PATH...    copy host files or folders into the sandbox (PATH is relative
                        to the notebook's folder; folders outside it may be named too)
%modbox pull|push PATH... --to DIR
                        copy into DIR instead (on the host: inside the copied folder)

Handled by the kernel, so %modbox lines need a cell of their own. Files that cells
write in the working folder come back by themselves after each cell (MODBOX_SYNC=cell,
the default; 'shutdown' or 'never' to change it); %modbox pull is for what does not:
files elsewhere, over MODBOX_SYNC_FILE_LIMIT or MODBOX_SYNC_LIMIT, or changed on the
host meanwhile."""

_LINE = re.compile(r"^%modbox(?=\s|\?|$)(.*)$")


class MagicError(Exception):
    """A %modbox line that cannot be run: the message is the sentence for the cell."""


def parse(code: str) -> list[str] | None:
    """The argument strings of a cell of %modbox lines only, else None."""
    lines = [line.strip() for line in code.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        return None
    found = []
    for line in lines:
        match = _LINE.match(line)
        if match is None:
            return None
        found.append(match.group(1).strip())
    return found


def help_for(code: str, cursor_pos: int) -> str | None:
    """The help text when the cursor's line is a %modbox line, else None."""
    start = code.rfind("\n", 0, cursor_pos) + 1
    end = code.find("\n", cursor_pos)
    line = code[start : end if end >= 0 else len(code)].strip()
    return HELP if _LINE.match(line) else None


class ModboxMagic:
    """Runs %modbox lines for one kernel; ``folder`` is the notebook's (host) folder."""

    def __init__(self, session: SandboxSession, folder: str | None) -> None:
        self.session = session
        self.folder = os.path.realpath(folder) if folder else None
        # The last cell's figures from the sandbox (the kernel sets them after each).
        self.last_cell: dict[str, Any] | None = None

    # -- running ------------------------------------------------------------------

    async def run(self, lines: list[str], relay: OutputRelay) -> list[dict[str, Any]]:
        """Run each line; its output goes to ``relay``. The payloads (help's page);
        MagicError with the sentence when a line fails (later lines do not run)."""
        payloads: list[dict[str, Any]] = []
        for line in lines:
            if line.startswith("?") or line.endswith("?"):
                payloads.append({"source": "page", "data": {"text/plain": HELP}, "start": 0})
                continue
            try:
                words = shlex.split(line)
            except ValueError as exc:
                raise MagicError(f"%modbox {line}: {exc}") from exc
            command = words[0] if words else "status"
            if command not in COMMANDS:
                raise MagicError(
                    f"%modbox has no command {command!r}; it knows {', '.join(COMMANDS)}"
                )
            if command == "help":
                relay.stream("stdout", HELP + "\n")
            elif command == "status":
                relay.stream("stdout", await self.status())
            else:
                paths, target = _split_to(words[1:], command)
                if not paths:
                    raise MagicError(f"%modbox {command} needs at least one PATH")
                runner = self._pull if command == "pull" else self._push
                for path in paths:
                    relay.stream("stdout", await runner(path, target))
            relay.flush()
        return payloads

    async def _ready(self) -> Any:
        try:
            return await self.session.ensure_ready()
        except ModboxError as exc:
            raise MagicError(f"no sandbox to copy files with: {exc}") from exc

    async def _pull(self, path: str, target: str | None) -> str:
        await self._ready()
        sync = self.session.files
        if sync.host is None or self.folder is None:
            raise MagicError("%modbox pull: this kernel has no host folder to copy into")
        root = sync.host.root
        base = "" if target is None else _host_rel(root, os.path.join(self.folder, target))

        def dest(source: str, kind: str) -> str:
            name = posixpath.basename(source.rstrip("/")) or "file"
            if target is not None:
                return f"{base}/{name}" if base else name
            inside = _under(source, sync.sandbox_root)
            if inside is not None and inside:
                return inside
            here = _host_rel(root, self.folder or root)
            return f"{here}/{name}" if here else name

        try:
            outcome = await sync.pull(_sandbox_path(sync.sandbox_cwd, path), dest)
        except Refused as exc:
            raise MagicError(f"%modbox pull {path}: {exc}") from exc
        except ModboxError as exc:
            raise MagicError(f"%modbox pull {path}: {_agent_reason(exc)}") from exc
        return _said("copied", path, "to the host", outcome)

    async def _push(self, path: str, target: str | None) -> str:
        await self._ready()
        sync = self.session.files
        host_path, files = await asyncio.to_thread(_host_files, self.folder, path)
        root = sync.host.root if sync.host is not None else None
        inside = _under(host_path, root) if root else None
        if target is not None:
            top = posixpath.join(_sandbox_path(sync.sandbox_cwd, target), _leaf(host_path))
        elif inside:
            top = posixpath.join(sync.sandbox_root, inside)
        else:
            top = posixpath.join(sync.sandbox_cwd, _leaf(host_path))
        pairs = [(src, posixpath.join(top, rel) if rel else top) for src, rel in files]
        try:
            outcome = await sync.push(pairs)
        except (OSError, ModboxError) as exc:
            raise MagicError(f"%modbox push {path}: {_agent_reason(exc)}") from exc
        return _said("copied", path, "into the sandbox", outcome)

    async def status(self) -> str:
        """The lines of ``%modbox`` (it waits for the sandbox, as a cell would)."""
        sandbox = await self._ready()
        session, sync = self.session, self.session.files
        cfg = session.config
        try:
            info = await session.query("info")
        except ModboxError:
            info = {}
        raw_usage = info.get("usage")
        usage: dict[str, Any] = raw_usage if isinstance(raw_usage, dict) else {}
        up = time.monotonic() - sandbox.created
        backend = (
            "the local Modbox service (bubblewrap jails on this machine)"
            if cfg.resolved_backend == "local"
            else f"Modbox at {cfg.api_url}"
        )
        image = cfg.image or cfg.image_id or sandbox.info.raw.get("image") or "the default image"
        python = info.get("python_version") or sandbox.agent_info.get("python_version", "?")
        ipython = info.get("ipython_version")
        rows = [
            ("backend", backend),
            ("sandbox", sandbox.info.id),
            ("image", str(image)),
            ("Python", f"{python}" + (f" (IPython {ipython})" if ipython else "")),
            ("uptime", _duration(up)),
            ("TTL left", _duration(max(0.0, cfg.ttl_seconds - up))),
        ]
        if "memory_bytes" in usage:
            scope = "the whole sandbox" if usage.get("memory_scope") == "sandbox" else "Python"
            rows.append(("memory used", f"{size_text(usage['memory_bytes'])} ({scope})"))
        if "cpu_seconds" in usage:
            rows.append(("CPU used", f"{usage['cpu_seconds']:.1f} s"))
        last = self.last_cell
        if last:
            rows.append(
                (
                    "last cell",
                    f"{last.get('seconds', 0):.3f} s in the sandbox, "
                    f"{last.get('cpu_seconds', 0):.2f} s CPU, peak memory "
                    f"{size_text(int(last.get('peak_memory_bytes') or 0))}",
                )
            )
        rows.append(("cells run in", str(usage.get("cwd") or sync.sandbox_cwd)))
        host = sync.host.root if sync.host is not None else "none (nothing was copied in)"
        rows.append(("host folder", host))
        mode = {"cell": "after each cell", "shutdown": "at shutdown", "never": "never"}
        rows.append(
            (
                "files back",
                f"{sync.synced.files} files ({size_text(sync.synced.size)}), "
                f"{mode.get(cfg.sync.mode, cfg.sync.mode)} (MODBOX_SYNC={cfg.sync.mode})",
            )
        )
        width = max(len(name) for name, _ in rows)
        return "".join(f"{name + ':':<{width + 2}}{value}\n" for name, value in rows)

    # -- completion ---------------------------------------------------------------

    def complete(self, code: str, cursor_pos: int) -> dict[str, Any] | None:
        """Matches for a %modbox line (commands; host paths after ``push``), or None
        to let the sandbox complete (sandbox paths after ``pull``, anything else)."""
        start = code.rfind("\n", 0, cursor_pos) + 1
        line = code[start:cursor_pos]
        match = re.match(r"^\s*%modbox(\s+)(.*)$", line)
        if match is None:
            return None
        words = match.group(2).split(" ")
        word = words[-1]
        begin = cursor_pos - len(word)
        if len(words) == 1:
            matches = [c for c in COMMANDS if c.startswith(word)]
        elif words[0] == "push" and self.folder is not None:
            matches = _host_matches(self.folder, word)
        else:
            return None
        return {"matches": matches, "cursor_start": begin, "cursor_end": cursor_pos}


def _split_to(words: list[str], command: str) -> tuple[list[str], str | None]:
    if "--to" not in words:
        return words, None
    at = words.index("--to")
    if at + 1 >= len(words):
        raise MagicError(f"%modbox {command}: --to needs a folder")
    return words[:at] + words[at + 2 :], words[at + 1]


def _sandbox_path(cwd: str, path: str) -> str:
    return posixpath.normpath(posixpath.join(cwd, path))


def _under(path: str, root: str | None) -> str | None:
    """``path`` relative to ``root`` when it is at or below it, else None."""
    if not root:
        return None
    if path == root:
        return ""
    prefix = root.rstrip("/") + "/"
    return path[len(prefix) :] if path.startswith(prefix) else None


def _host_rel(root: str, path: str) -> str:
    """A host folder relative to the copied root; MagicError when it is outside."""
    full = os.path.realpath(path)
    rel = _under(full, root)
    if rel is None:
        raise MagicError(
            f"{path} is outside the notebook's folder on the host ({root}); "
            "files from the sandbox are only written inside it"
        )
    if rel:
        try:
            safe_parts(rel)
        except Refused as exc:
            raise MagicError(f"{path}: {exc}") from exc
    return rel


def _leaf(path: str) -> str:
    return os.path.basename(path.rstrip(os.sep)) or "file"


def _host_files(folder: str | None, given: str) -> tuple[str, list[tuple[str, str]]]:
    """The host path ``given`` names (relative to ``folder``), and [(host file, name
    below it)] of that file or folder (links below it not followed); blocking."""
    base = folder or os.getcwd()
    path = os.path.realpath(os.path.join(base, os.path.expanduser(given)))
    if not os.path.exists(path):
        raise MagicError(f"%modbox push {given}: no such file or folder on the host")
    if not os.path.isdir(path):
        return path, [(path, "")]
    found: list[tuple[str, str]] = []
    for directory, dirs, names in os.walk(path):
        dirs.sort()
        for name in sorted(names):
            full = os.path.join(directory, name)
            if os.path.isfile(full) and not os.path.islink(full):
                found.append((full, os.path.relpath(full, path).replace(os.sep, "/")))
            if len(found) > MAX_PUSHED:
                raise MagicError(f"{given} holds more than {MAX_PUSHED} files; push fewer")
    return path, found


def _host_matches(folder: str, word: str) -> list[str]:
    directory, _, stem = word.rpartition("/")
    where = os.path.join(folder, directory) if directory else folder
    try:
        names = sorted(os.listdir(where))
    except OSError:
        return []
    out = []
    for name in names:
        if name.startswith(stem) and (stem.startswith(".") or not name.startswith(".")):
            full = f"{directory}/{name}" if directory else name
            out.append(full + ("/" if os.path.isdir(os.path.join(where, name)) else ""))
    return out


def _agent_reason(exc: Exception) -> str:
    text = str(exc)
    marker = "refused a request: "
    return text.split(marker, 1)[1] if marker in text else text


def _said(verb: str, path: str, where: str, outcome: Outcome) -> str:
    files = "1 file" if outcome.files == 1 else f"{outcome.files} files"
    line = f"{verb} {path} {where}: {files}, {size_text(outcome.size)}\n"
    return line + "".join(f"  {notice}\n" for notice in outcome.notices)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"
