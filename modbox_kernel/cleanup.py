"""``python -m modbox_kernel cleanup``: destroy the sandboxes of this user's dead kernels.

For operators and users of a shared or remote Modbox service. It reads the records
kernels leave in the user's state directory (``records.py``), keeps those of the service
configured now (``MODBOX_API_URL``, ``MODBOX_API_TOKEN``, ``MODBOX_WORKSPACE_ID``, as the
kernel reads them) whose kernel process is gone, and lists them; with ``--yes`` it
destroys them. It only ever touches sandboxes this user's kernels made, and never
prints a token. A kernel does the same by itself when it starts (``keeper.sweep``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from . import records
from .api import ModboxClient
from .errors import ModboxError
from .settings import EnvSettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m modbox_kernel cleanup",
        description="List (or, with --yes, destroy) the sandboxes of this user's kernels "
        "that died without shutting down, on the service MODBOX_API_URL names.",
    )
    parser.add_argument("--yes", action="store_true", help="destroy them (default: only list)")
    args = parser.parse_args(argv)
    env = EnvSettings()
    if env.problems:
        for problem in env.problems:
            print(f"modbox cleanup: {problem}", file=sys.stderr)
        return 2
    api_url, token = env.text("api_url"), env.text("api_token") or None
    workspace = env.text("workspace_id") or None
    dead = [r for r in records.dead(api_url) if r.workspace_id == workspace]
    if not dead:
        print(f"No sandboxes of dead kernels on {api_url}.")
        return 0
    if not args.yes:
        for record in dead:
            print(f"would destroy sandbox {record.sandbox_id} (kernel pid {record.pid}, gone)")
        print(f"{len(dead)} to destroy; run again with --yes to destroy them.")
        return 0
    return asyncio.run(_destroy(api_url, token, workspace, dead))


async def _destroy(
    api_url: str, token: str | None, workspace: str | None, dead: list[records.Record]
) -> int:
    failed = 0
    async with ModboxClient(api_url, token, workspace_id=workspace) as client:
        for record in dead:
            what = f"sandbox {record.sandbox_id} (kernel pid {record.pid}, gone)"
            try:
                known = await client.destroy_sandbox(record.sandbox_id)
            except ModboxError as exc:
                failed += 1
                print(f"could not destroy {what}: {exc}", file=sys.stderr)
                continue  # the record stays, for the next try
            records.forget(record.sandbox_id)
            print(f"destroyed {what}" if known else f"{what} was already gone")
    return 1 if failed else 0
