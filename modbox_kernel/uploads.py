"""Putting bytes into a sandbox, and describing what an exec said.

Who calls it: the agent bootstrap (``bootstrap.py``) for the agent artifact, the folder
copy (``foldercopy.py``) for the notebook's folder, and the agent channel
(``channel.py``) for requests too large for one exec command line.
"""

from __future__ import annotations

import base64
import contextlib
import shlex

from .api import ExecResult, SandboxRuntime
from .errors import AgentError, ModboxError

# Base64 characters per exec when uploads are unavailable (well under ARG_MAX).
EXEC_CHUNK = 48 * 1024


async def put_file(
    runtime: SandboxRuntime,
    state_dir: str,
    name: str,
    data: bytes,
    *,
    upload_dir: str | None = None,
) -> str:
    """Place ``data`` in the sandbox and return its absolute path there.

    The documented upload call comes first (one request, any size up to 50 MB);
    where it is unavailable or lands somewhere unexpected, the bytes are written
    with exec in base64 chunks, which needs nothing but bash and base64. With
    ``upload_dir`` (where the agent's own upload was found at bootstrap) the
    upload's location is known and not looked up again.
    """
    with contextlib.suppress(ModboxError):
        meta = await runtime.upload(name, data)
        if upload_dir is not None:
            return f"{upload_dir}/{name}"
        candidates = [p for p in (meta.get("path"), f"/workspace/uploads/{name}") if p]
        for path in candidates:
            check = await runtime.exec(f"test -f {shlex.quote(str(path))}")
            if check.exit_code == 0:
                return str(path)
    path = f"{state_dir}/{name}"
    b64 = base64.b64encode(data).decode("ascii")
    tmp = shlex.quote(path + ".b64")
    res = await runtime.exec(f": > {tmp}")
    for i in range(0, len(b64), EXEC_CHUNK):
        res = await runtime.exec(f"printf %s '{b64[i : i + EXEC_CHUNK]}' >> {tmp}")
        if res.exit_code != 0:
            raise AgentError(f"could not write {name} into the sandbox: {tail(res)}")
    res = await runtime.exec(f"base64 -d {tmp} > {shlex.quote(path)} && rm -f {tmp}")
    if res.exit_code != 0:
        raise AgentError(f"could not write {name} into the sandbox: {tail(res)}")
    return path


def tail(res: ExecResult, limit: int = 300) -> str:
    """The end of what an exec printed (stderr first) and its exit code, for errors."""
    text = (res.stderr or res.stdout or "").strip()
    if len(text) > limit:
        text = "…" + text[-limit:]
    return f"{text or 'no output'} (exit code {res.exit_code})"
