"""What a warm agent process would save at each sandbox start (a probe, not a feature).

``python bench/probe_warm_fork.py [--runs N]`` prints the CPU (user + system, median of
N) of the sandbox's share of a start, done two ways outside any jail:

* cold: a fresh interpreter imports the agent (from its bytecode, as the agent's zip
  provides it), makes IPython's shell and runs ``1+1``: what every sandbox pays today;
* forked: a child of a parent that has already imported the agent and IPython makes
  the shell and runs ``1+1``: what a service-wide warm process could hand each jail.

``docs/classroom.md`` ("Arrivals") quotes its figures. The forked figure leaves out
what entering a jail would add (a handful of system calls), so it is a lower bound.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from modbox_kernel.agent import build_agent

CELL = "1+1"
WORK = (
    "from IPython.core.interactiveshell import InteractiveShell\n"
    f"InteractiveShell.instance().run_cell({CELL!r}, store_history=True, silent=True)\n"
)


def _child_cpu(start: subprocess.Popen[bytes] | int) -> float:
    """Wait for one child and return the CPU it used (children's rusage delta)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    if isinstance(start, int):
        os.waitpid(start, 0)
    else:
        start.wait()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def cold(agent_dir: str, runs: int) -> list[float]:
    code = f"import sys; sys.path.insert(0, {agent_dir!r}); import modbox_agent.core\n{WORK}"
    # IPython writes its history and profile under HOME: give it a scratch one.
    env = {**os.environ, "HOME": tempfile.mkdtemp(prefix="probe-home-")}
    return [
        _child_cpu(subprocess.Popen([sys.executable, "-c", code], env=env)) for _ in range(runs)
    ]


def forked(agent_dir: str, runs: int) -> list[float]:
    os.environ["HOME"] = tempfile.mkdtemp(prefix="probe-home-")
    sys.path.insert(0, agent_dir)
    import modbox_agent.core  # noqa: F401  (the warm parent's imports)
    from IPython.core.interactiveshell import InteractiveShell  # noqa: F401

    figures = []
    for _ in range(runs):
        pid = os.fork()
        if pid == 0:
            try:
                exec(WORK, {})
            finally:
                os._exit(0)
        figures.append(_child_cpu(pid))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=21)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="probe-agent-") as agent_dir:
        archive_path = Path(agent_dir) / "agent.pyz"
        archive_path.write_bytes(build_agent())
        with zipfile.ZipFile(archive_path) as archive:
            archive.extractall(agent_dir)
        cold_s = statistics.median(cold(agent_dir, args.runs))
        forked_s = statistics.median(forked(agent_dir, args.runs))
    print(f"sandbox share of a start, CPU median of {args.runs} ({sys.executable}):")
    print(f"  cold interpreter  {cold_s * 1000:7.1f} ms")
    print(f"  forked from warm  {forked_s * 1000:7.1f} ms")
    print(f"  saved per start   {(cold_s - forked_s) * 1000:7.1f} ms ({cold_s / forked_s:.1f}x)")


if __name__ == "__main__":
    main()
