"""Putting the agent into a new sandbox and starting it there (or starting it again).

Who calls what, and when: the session (``session.py``) calls :func:`prepare_agent` while
it provisions a sandbox (which adopts an agent started in advance, or installs and
starts one: :func:`adopt_agent`, :func:`install_agent`, :func:`start_agent`), and
:func:`restart_agent` when the kernel gives up on a cell that ignored its interrupt.
The agent is the one-file artifact built by ``modbox_kernel.agent``; its start line is
one JSON object (``docs/agent-protocol.md``).
"""

from __future__ import annotations

import asyncio
import json
import posixpath
import shlex
from collections.abc import Awaitable, Callable
from typing import Any

from . import agent as agent_mod
from .api import SandboxRuntime
from .errors import AgentError, ModboxError
from .uploads import put_file, tail


async def prepare_agent(
    runtime: SandboxRuntime, advert: Any, left: Callable[[], float]
) -> tuple[str, str, Awaitable[dict[str, Any]]]:
    """(state dir, agent file, the agent's start line to await) for a new sandbox.

    ``advert`` is the detail's ``agent`` field (:func:`adopt_agent`); ``left()`` gives
    the seconds the startup deadline leaves for each step. The start line is returned
    unawaited, so the caller can copy the notebook's folder while the agent starts.
    """
    adopted = await asyncio.wait_for(adopt_agent(runtime, advert), left())
    if adopted is not None:
        state_dir, agent_file, started = adopted
        return state_dir, agent_file, asyncio.sleep(0, started)
    state_dir, agent_file = await asyncio.wait_for(install_agent(runtime), left())
    return (
        state_dir,
        agent_file,
        asyncio.wait_for(start_agent(runtime, state_dir, agent_file), left()),
    )


async def adopt_agent(
    runtime: SandboxRuntime, advert: Any
) -> tuple[str, str, dict[str, Any]] | None:
    """The agent a service started in advance, if it is ours and unused; else None.

    ``advert`` is the sandbox detail's ``agent`` field, an extension of the local
    service's pool (``modbox_kernel/local/pool.py``); the documented API has no such
    field, and then this returns None at once. The agent itself must confirm that it
    runs this kernel's version and that no cell ever reached it (``pristine``): a
    kernel never inherits another's namespace. Returns (state dir, agent file, info).
    """
    if not isinstance(advert, dict) or advert.get("version") != agent_mod.AGENT_VERSION:
        return None
    state_dir, agent_file = advert.get("state_dir"), advert.get("agent_file")
    if not isinstance(state_dir, str) or not isinstance(agent_file, str):
        return None
    try:
        res = await runtime.exec(agent_mod.request_command(state_dir, {"op": "info"}))
    except ModboxError:
        return None  # the usual bootstrap then says what is wrong, if anything is
    try:
        answer = json.loads(res.stdout.strip() or "null")
    except ValueError:
        answer = None
    info = answer.get("reply") if isinstance(answer, dict) and answer.get("ok") else None
    if (
        res.exit_code != 0
        or not isinstance(info, dict)
        or info.get("agent_version") != agent_mod.AGENT_VERSION
        or info.get("pristine") is not True
    ):
        return None
    return state_dir, agent_file, dict(info)


async def install_agent(runtime: SandboxRuntime) -> tuple[str, str]:
    """Put the agent into the sandbox; returns (state dir, agent file), both absolute."""
    # One exec learns the sandbox's home directory, so every later path is absolute
    # and does not depend on the working directory a real image gives exec.
    res = await runtime.exec('mkdir -p "$HOME/.modbox" && cd "$HOME/.modbox" && pwd -P')
    if res.exit_code != 0 or not res.stdout.strip():
        raise AgentError(f"could not prepare the sandbox: {tail(res)}")
    state_dir = res.stdout.strip().splitlines()[-1]
    name = agent_mod.agent_file_name()
    agent_file = await put_file(runtime, state_dir, name, agent_mod.agent_artifact())
    return state_dir, agent_file


def upload_dir(state_dir: str, agent_file: str) -> str | None:
    """Where uploads land, learned from where the agent's own upload landed; None when
    the agent had to be written with exec (into ``state_dir``) because uploads failed."""
    directory = posixpath.dirname(agent_file)
    return None if directory == state_dir else directory


async def start_agent(runtime: SandboxRuntime, state_dir: str, agent_file: str) -> dict[str, Any]:
    """Start (or restart: the agent stops an earlier one) and return its start line."""
    res = await runtime.exec(agent_mod.start_command(agent_file, state_dir), read_timeout=60.0)
    line = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
    try:
        start_info = json.loads(line)
    except ValueError:
        start_info = {}
    if res.exit_code != 0 or not start_info.get("ok"):
        reason = start_info.get("error") or tail(res)
        raise AgentError(f"the Python agent did not start in the sandbox: {reason}")
    return dict(start_info)


async def restart_agent(runtime: SandboxRuntime, state_dir: str, agent_file: str) -> dict[str, Any]:
    """SIGKILL the agent (a cell that ignores interrupts stops with it), start a new one.

    Files in the sandbox are kept; the namespace is gone.
    """
    pid_file = shlex.quote(f"{state_dir}/pid")
    await runtime.exec(
        f'P=$(cat {pid_file} 2>/dev/null) && kill -9 "$P" 2>/dev/null; true',
        read_timeout=10.0,
    )
    return await start_agent(runtime, state_dir, agent_file)
