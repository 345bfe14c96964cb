"""Copying the notebook's folder into a new sandbox, so relative paths work there.

Who calls what, and when: the session starts :func:`modbox_kernel.workdir.pack_folder`
in a worker thread as soon as it provisions a sandbox, and calls :func:`copy_folder`
while the agent starts; the archive is uploaded and unpacked in the exec's default
directory, which is where the agent and its cells run. The copy is a convenience: it
never fails the sandbox, it returns the sentence that says why nothing was copied.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
import uuid
from collections.abc import Callable

from .api import SandboxRuntime
from .errors import AgentError
from .uploads import put_file, tail
from .workdir import Packed

log = logging.getLogger(__name__)


async def copy_folder(
    runtime: SandboxRuntime,
    folder: str,
    packing: asyncio.Future[Packed],
    *,
    state_dir: str,
    upload_dir: str | None,
    left: Callable[[], float],
) -> str | None:
    """Unpack what ``packing`` packed of ``folder``; None, or why nothing was copied.

    ``left`` is the time left of the sandbox's start (it raises once none is).
    """
    try:
        packed = await asyncio.wait_for(asyncio.shield(packing), left())
        if packed.skipped or packed.archive is None:
            return packed.skipped
        name = f"modbox-folder-{uuid.uuid4().hex[:12]}.tar.gz"
        path = await asyncio.wait_for(
            put_file(runtime, state_dir, name, packed.archive, upload_dir=upload_dir),
            left(),
        )
        res = await runtime.exec(unpack_command(path), read_timeout=max(10.0, left()))
        if res.exit_code != 0:
            raise AgentError(f"unpacking failed: {tail(res)}")
    except Exception as exc:  # a convenience: never a reason to fail the sandbox
        log.warning("could not copy %s into the sandbox: %s", folder, exc)
        return f"the files of {folder} could not be copied into the sandbox ({exc})"
    log.info(
        "copied %d files (%.1f MiB) of %s into the sandbox",
        packed.files,
        packed.size / 2**20,
        folder,
    )
    return None


def unpack_command(archive: str) -> str:
    """Unpack a gzip'd tar in the exec's directory and remove it: tar, else Python."""
    a = shlex.quote(archive)
    python = "import sys, tarfile; tarfile.open(sys.argv[1]).extractall()"
    return (
        f"if command -v tar >/dev/null 2>&1; then tar -xzf {a}; "
        f"else python3 -c {shlex.quote(python)} {a}; fi; rc=$?; rm -f {a}; exit $rc"
    )
