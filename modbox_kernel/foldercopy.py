"""The sandbox's working folder: made, filled with the notebook's folder, entered.

Who calls what, and when: the session starts :func:`modbox_kernel.workdir.pack_for`
in a worker thread as soon as it provisions a sandbox, and calls :func:`place_folder`
while the agent starts. That makes a folder named after the host's inside the exec's
default directory, and unpacks the archive there: cells then see the notebook's
files and what they write, not the sandbox's own entries (``uploads/``, the agent's
state, IPython's profile live beside it or in ``$HOME``). Once the agent runs,
:func:`enter_folder` moves it there. The copy is a convenience: it never fails the
sandbox; the sentence that says why nothing was copied becomes a notice.
"""

from __future__ import annotations

import asyncio
import logging
import posixpath
import shlex
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from .api import SandboxRuntime
from .channel import AgentChannel
from .errors import AgentError
from .uploads import put_file, tail
from .workdir import Packed

# The name in the exec's default folder that belongs to the sandbox (uploads land
# there), never used for the working folder.
UPLOADS = "uploads"

log = logging.getLogger(__name__)


@dataclass
class Placed:
    """Where a sandbox's working folder ended up, and what it holds."""

    root: str  # the working folder's root in the sandbox (absolute)
    cwd: str  # where cells run: the notebook's place below the root
    host_root: str | None = None  # the host folder it mirrors (None: nothing copied in)
    copied: dict[str, tuple[int, int]] = field(default_factory=dict)
    notice: str | None = None  # why the files were not copied, for the first cell


def folder_name(host_root: str | None) -> str:
    """The working folder's name in the sandbox: the host folder's, where it cannot be
    mistaken for the sandbox's own entries (``uploads``, hidden names)."""
    name = posixpath.basename((host_root or "").rstrip("/"))
    if not name or name.startswith(".") or name == UPLOADS:
        return "notebook"
    return name


async def place_folder(
    runtime: SandboxRuntime,
    packing: asyncio.Future[Packed] | None,
    *,
    state_dir: str,
    upload_dir: str | None,
    left: Callable[[], float],
) -> Placed:
    """Make the working folder and unpack what ``packing`` packed into it.

    ``left`` is the time left of the sandbox's start (it raises once none is). Never
    raises for the copy itself: a copy that failed is a notice, the folder stays.
    """
    packed: Packed | None = None
    notice = None
    if packing is not None:
        try:
            packed = await asyncio.wait_for(asyncio.shield(packing), left())
        except Exception as exc:
            notice = f"the notebook's folder could not be packed for the sandbox ({exc})"
    host_root = packed.root if packed is not None else None
    name = shlex.quote(folder_name(host_root))
    command = f"mkdir -p -- {name} && cd -- {name} && pwd -P"
    archive = None
    if packed is not None and packed.archive is not None and not packed.skipped:
        try:
            archive_name = f"modbox-folder-{uuid.uuid4().hex[:12]}.tar.gz"
            archive = await asyncio.wait_for(
                put_file(runtime, state_dir, archive_name, packed.archive, upload_dir=upload_dir),
                left(),
            )
            command += " && " + unpack_command(archive)
        except Exception as exc:
            log.warning("could not upload the notebook's folder: %s", exc)
            notice = f"the files of {host_root} could not be copied into the sandbox ({exc})"
    elif packed is not None:
        notice = packed.skipped
    res = await runtime.exec(command, read_timeout=max(10.0, left()))
    lines = res.stdout.strip().splitlines()
    if not lines or not lines[0].startswith("/"):
        raise AgentError(f"could not make the working folder: {tail(res)}")
    root = lines[0]
    if res.exit_code != 0:
        log.warning("could not unpack %s in the sandbox: %s", host_root, tail(res))
        notice = f"the files of {host_root} could not be copied into the sandbox ({tail(res)})"
    elif archive is not None and packed is not None:
        log.info(
            "copied %d files (%.1f MiB) of %s into the sandbox",
            packed.files,
            packed.size / 2**20,
            host_root,
        )
    rel = packed.rel if packed is not None else ""
    copied = packed.copied if packed is not None and archive is not None and not notice else {}
    return Placed(
        root=root,
        cwd=posixpath.join(root, rel) if rel else root,
        host_root=host_root,
        copied=copied,
        notice=notice,
    )


async def enter_folder(channel: AgentChannel, placed: Placed, *, track: bool) -> None:
    """Move the agent into the working folder and start tracking its files there
    (``track``: after every cell). The first and every restarted agent need it."""
    request = {"op": "workdir", "cwd": placed.cwd, "root": placed.root, "track": track}
    await channel.request(request, read_timeout=30.0)


def unpack_command(archive: str) -> str:
    """Unpack a gzip'd tar in the exec's directory and remove it: tar, else Python."""
    a = shlex.quote(archive)
    python = "import sys, tarfile; tarfile.open(sys.argv[1]).extractall()"
    return (
        f"if command -v tar >/dev/null 2>&1; then tar -xzf {a}; "
        f"else python3 -c {shlex.quote(python)} {a}; fi; rc=$?; rm -f {a}; exit $rc"
    )
