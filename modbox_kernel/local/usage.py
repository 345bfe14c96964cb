"""Usage accounting per owner, and ``modbox-local usage``, the report for cost reviews.

Who calls what, and when: ``registry.Registry`` calls :meth:`UsageBook.settle` as each
sandbox is torn down (before its cgroup goes, so its figures can still be read) and
:meth:`UsageBook.count_event` when a sandbox is OOM-killed or an exec hits its time
limit; ``GET /usage`` (``routes_control``) answers :meth:`UsageBook.report`, which adds
the live sandboxes' figures so far. The admin sees every owner; an owner credential its
own row. :func:`main` fetches that route and prints a table, ``--json`` or ``--csv``.

Figures per owner: sandboxes made, sandbox-seconds (wall time alive), CPU-seconds of
all their processes (the cpu accounting cgroup), peak memory of the biggest sandbox
(the memory cgroup's high-water mark, page cache included), out-of-memory and
time-limit events. Without cgroups, CPU and memory are unknown (null).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .records import Sandbox

#: The row of sandboxes made with the service token itself.
ADMIN_OWNER = "(service token)"


@dataclass
class OwnerUsage:
    owner: str
    sandboxes: int = 0
    sandbox_seconds: float = 0.0
    cpu_seconds: float | None = None
    peak_memory_bytes: int | None = None
    oom_kills: int = 0
    time_limits: int = 0

    def add(self, seconds: float, cpu: float | None, peak: int | None) -> None:
        self.sandboxes += 1
        self.sandbox_seconds += seconds
        if cpu is not None:
            self.cpu_seconds = (self.cpu_seconds or 0.0) + cpu
        if peak is not None:
            self.peak_memory_bytes = max(self.peak_memory_bytes or 0, peak)


class UsageBook:
    """What ended sandboxes used, per owner, for the life of the service."""

    def __init__(self) -> None:
        self._settled: dict[str, OwnerUsage] = {}
        self._events: dict[str, dict[str, int]] = {}

    def settle(self, sandbox: Sandbox) -> None:
        """Book a sandbox being torn down (call before its cgroup is removed)."""
        cpu, peak = _readings(sandbox)
        row = self._settled.setdefault(_owner(sandbox), OwnerUsage(_owner(sandbox)))
        row.add(time.monotonic() - sandbox.created_mono, cpu, peak)

    def count_event(self, sandbox: Sandbox, kind: str) -> None:
        """``kind``: ``oom_kills`` or ``time_limits``."""
        events = self._events.setdefault(_owner(sandbox), {})
        events[kind] = events.get(kind, 0) + 1

    def report(self, live: Iterable[Sandbox], owner: str | None = None) -> list[OwnerUsage]:
        """Every owner's figures (or only ``owner``'s), live sandboxes included."""
        rows = {name: OwnerUsage(**asdict(row)) for name, row in self._settled.items()}
        for sandbox in live:
            cpu, peak = _readings(sandbox)
            row = rows.setdefault(_owner(sandbox), OwnerUsage(_owner(sandbox)))
            row.add(time.monotonic() - sandbox.created_mono, cpu, peak)
        for name, events in self._events.items():
            row = rows.setdefault(name, OwnerUsage(name))
            row.oom_kills = events.get("oom_kills", 0)
            row.time_limits = events.get("time_limits", 0)
        return [r for name, r in sorted(rows.items()) if owner is None or name == owner]


def _owner(sandbox: Sandbox) -> str:
    return sandbox.owner or ADMIN_OWNER


def _readings(sandbox: Sandbox) -> tuple[float | None, int | None]:
    if sandbox.cgroup is None:
        return None, None
    return sandbox.cgroup.cpu_seconds(), sandbox.cgroup.peak_memory()


# --------------------------------------------------------------------------- the CLI


def main(argv: list[str] | None = None) -> int:
    """``modbox-local usage``: print the usage report of a running service."""
    import httpx

    parser = argparse.ArgumentParser(prog="modbox-local usage", description=__doc__)
    parser.add_argument(
        "--url",
        default=os.environ.get("MODBOX_API_URL", "http://127.0.0.1:8765"),
        help="the service (default: $MODBOX_API_URL, else http://127.0.0.1:8765)",
    )
    parser.add_argument(
        "--token",
        default=None,
        help="the service token (default: $MODBOX_LOCAL_TOKEN, else $MODBOX_API_TOKEN)",
    )
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument("--json", action="store_true", help="print JSON")
    shape.add_argument("--csv", action="store_true", help="print CSV")
    args = parser.parse_args(argv)
    token = args.token or os.environ.get("MODBOX_LOCAL_TOKEN") or os.environ.get("MODBOX_API_TOKEN")
    if not token:
        print("modbox-local usage: pass --token or set MODBOX_LOCAL_TOKEN", file=sys.stderr)
        return 2
    try:
        answer = httpx.get(
            args.url.rstrip("/") + "/usage",
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
    except httpx.HTTPError as exc:
        print(f"modbox-local usage: {args.url} did not answer ({exc})", file=sys.stderr)
        return 1
    if answer.status_code != 200:
        message = answer.json().get("error", {}).get("message", answer.text[:200])
        print(f"modbox-local usage: HTTP {answer.status_code}: {message}", file=sys.stderr)
        return 1
    rows: list[dict[str, Any]] = answer.json()["owners"]
    print(render(rows, "json" if args.json else "csv" if args.csv else "table"), end="")
    return 0


COLUMNS = (
    "owner",
    "sandboxes",
    "sandbox_seconds",
    "cpu_seconds",
    "peak_memory_bytes",
    "oom_kills",
    "time_limits",
)


def render(rows: list[dict[str, Any]], shape: str) -> str:
    """The report as a table, CSV or JSON text."""
    if shape == "json":
        return json.dumps({"owners": rows}, indent=2) + "\n"
    out = io.StringIO()
    if shape == "csv":
        writer = csv.DictWriter(out, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue()
    cells = [["owner", "sandboxes", "sandbox-s", "cpu-s", "peak memory", "OOM", "time limits"]]
    for r in rows:
        peak = r.get("peak_memory_bytes")
        cpu = r.get("cpu_seconds")
        cells.append(
            [
                str(r["owner"]),
                str(r["sandboxes"]),
                f"{r['sandbox_seconds']:.0f}",
                "?" if cpu is None else f"{cpu:.1f}",
                "?" if peak is None else f"{peak / 2**20:.0f} MiB",
                str(r["oom_kills"]),
                str(r["time_limits"]),
            ]
        )
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    for row in cells:
        pairs = zip(row, widths, strict=True)
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(pairs)]
        out.write("  ".join(padded).rstrip() + "\n")
    return out.getvalue()
