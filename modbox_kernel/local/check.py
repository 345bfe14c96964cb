"""``python -m modbox_kernel.local --check``: what isolation this host really gives.

Who calls it: ``__main__`` with the resolved :class:`~.config.ServiceConfig` (and a
throw-away state dir), instead of serving. It chooses the jail exactly as the service
would, starts one real sandbox through the registry, and reports each feature from
what it *observes*: the sandbox's own ``/proc/self/status``, ``/proc/self/limits``,
namespaces and mounts from inside, the sandbox processes' uid and cgroup files from
the host. A feature is "in force" only when observed, so an operator learns what they
are getting, not what was asked for.

Exit status: 0 when sandboxes are isolated, or when they would run unisolated but
isolation is not required; 2 when isolation is required and unavailable (the service
would refuse to start).
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from . import probecache, seccomp
from .cgroups import CgroupManager
from .cgroups import detect as detect_cgroups
from .config import ServiceConfig
from .isolation import StartupError, choose_jail
from .jail import BwrapJail, Jail
from .procscan import sandbox_pids
from .registry import ProvisionInput, Registry
from .units import human_bytes

NAMESPACES = ("user", "pid", "net", "ipc", "uts", "cgroup", "mnt")

# Runs inside the probe sandbox; prints one JSON object. Stdlib only.
_PROBE = r"""
import json, os, subprocess
def status():
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out
def limits():
    out = {}
    for line in open("/proc/self/limits").read().splitlines()[1:]:
        out[line[:26].strip()] = line[26:47].strip()
    return out
def size(path):
    try:
        st = os.statvfs(path)
        return st.f_blocks * st.f_frsize
    except OSError:
        return None
nested = subprocess.run(["unshare", "-U", "true"], capture_output=True).returncode
ifaces = [l.split(":")[0].strip() for l in open("/proc/net/dev").read().splitlines()[2:]]
print(json.dumps({
    "status": status(), "limits": limits(), "uid": os.getuid(), "gid": os.getgid(),
    "ns": {n: os.readlink(f"/proc/self/ns/{n}") for n in NAMESPACES},
    "nested_userns_exit": nested, "ifaces": ifaces,
    "tmp": size("/tmp"), "shm": size("/dev/shm"), "workspace": size(os.getcwd()),
    "ipython": subprocess.run(["python3", "-c", "import IPython"]).returncode == 0,
}))
"""


@dataclass
class Line:
    ok: bool | None  # True: in force; False: not in force; None: off by configuration
    text: str

    def render(self) -> str:
        tag = {True: "in force", False: "NOT in force", None: "off"}[self.ok]
        return f"  [{tag:^12}] {self.text}"


async def run_check(config: ServiceConfig) -> int:
    header = _header(config)
    try:
        jail = choose_jail(config, remembered=False)
        failure = None
    except StartupError as exc:
        jail, failure = None, str(exc)
        probecache.forget()  # what the host gives changed: no later start may skip a probe
    print(header)
    if jail is None:
        print(Line(False, f"bubblewrap jail: {failure}").render())
        print("result: sandboxes cannot be isolated here; the service would refuse to start")
        return 2
    cgroups = detect_cgroups(config.limits.memory, config.limits.nproc, config.limits.cpus)
    registry = Registry(config, jail, cgroups)
    try:
        facts, host = await _probe_sandbox(registry)
    finally:
        await registry.close()
    for line in _report(config, jail, cgroups, facts, host):
        print(line.render())
    if jail.mode == "bwrap":
        print(f"result: sandboxes are isolated with bubblewrap; {jail.privilege.describe()}")
    else:
        print(
            "result: NO ISOLATION: sandboxes run as plain host processes "
            "(set MODBOX_REQUIRE_ISOLATION=1 to make this an error)"
        )
    sys.stdout.flush()
    return 0


def _header(config: ServiceConfig) -> str:
    who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"
    return (
        f"modbox local service isolation check: Linux {platform.release()}, "
        f"{platform.machine()}, service running as {who}"
    )


async def _probe_sandbox(registry: Registry) -> tuple[dict[str, Any], dict[str, Any]]:
    request = ProvisionInput(
        name="modbox-check", client_reference=None, image="check", env_vars={}, ttl_seconds=600
    )
    sandbox = registry.create(request)
    waited = await registry.wait_ready(sandbox, 60)
    if not waited["ready"]:
        raise SystemExit(f"modbox-local --check: the probe sandbox did not start: {waited}")
    script = _PROBE.replace("NAMESPACES", repr(NAMESPACES))
    answer = await registry.exec(sandbox, f"python3 -I -c {_quote(script)}", 60)
    try:
        facts: dict[str, Any] = json.loads(answer["stdout"])
    except ValueError:
        raise SystemExit(f"modbox-local --check: the probe failed: {answer}") from None
    host: dict[str, Any] = {
        "uids": await asyncio.to_thread(_host_uids, sandbox.id),
        "ns": {n: os.readlink(f"/proc/self/ns/{n}") for n in NAMESPACES},
        "cgroup": _cgroup_values(sandbox.cgroup.dirs if sandbox.cgroup else ()),
        "bwrap_version": _bwrap_version(registry.jail),
    }
    await registry.destroy(sandbox)
    return facts, host


def _host_uids(sandbox_id: str) -> list[str]:
    """The real uids, as the host sees them, of the sandbox's processes."""
    uids: set[str] = set()
    for pid in sandbox_pids(sandbox_id):
        try:
            with open(f"/proc/{pid}/status") as f:
                uids.update(ln.split()[1] for ln in f if ln.startswith("Uid:"))
        except OSError:
            continue
    return sorted(uids)


def _cpu_quota(cg: dict[str, str]) -> float | None:
    """CPUs allowed by the cgroup (v1 cfs quota/period or v2 cpu.max), None if unlimited."""
    if "cpu.max" in cg:
        quota, _, period = cg["cpu.max"].partition(" ")
    else:
        quota, period = cg.get("cpu.cfs_quota_us", ""), cg.get("cpu.cfs_period_us", "")
    if quota.isdigit() and period.isdigit() and int(period) > 0:
        return int(quota) / int(period)
    return None


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def _cgroup_values(dirs: tuple[Any, ...]) -> dict[str, str]:
    values = {}
    names = (
        "memory.limit_in_bytes",
        "memory.max",
        "memory.memsw.limit_in_bytes",
        "memory.swap.max",
        "memory.oom.group",
        "pids.max",
        "cpu.cfs_quota_us",
        "cpu.cfs_period_us",
        "cpu.max",
        "cpu.shares",
        "cpu.weight",
    )
    for d in dirs:
        for name in names:
            try:
                values[name] = (d / name).read_text().strip()
            except OSError:
                continue
    return values


def _bwrap_version(jail: Jail) -> str:
    if not isinstance(jail, BwrapJail):
        return ""
    try:
        done = subprocess.run([jail.bwrap, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "?"
    return done.stdout.strip()


def _report(
    config: ServiceConfig,
    jail: Jail,
    cgroups: CgroupManager,
    facts: dict[str, Any],
    host: dict[str, Any],
) -> list[Line]:
    lim = config.limits
    st, rl = facts["status"], facts["limits"]
    bwrap = isinstance(jail, BwrapJail)
    lines = []
    if bwrap:
        assert isinstance(jail, BwrapJail)
        lines.append(Line(True, f"bubblewrap jail: {jail.bwrap} ({host['bwrap_version']})"))
    else:
        lines.append(Line(False, "bubblewrap jail: none (plain host processes)"))
    new = [n for n in NAMESPACES if facts["ns"][n] != host["ns"][n]]
    shared = [n for n in NAMESPACES if n not in new]
    lines.append(
        Line(
            not shared,
            f"namespaces: new {', '.join(new) or 'none'}"
            + (f"; shared with the host: {', '.join(shared)}" if shared else ""),
        )
    )
    lines.append(
        Line(
            facts["nested_userns_exit"] != 0,
            "nested user namespaces: "
            + ("refused" if facts["nested_userns_exit"] != 0 else "ALLOWED (unshare -U works)"),
        )
    )
    only_lo = facts["ifaces"] == ["lo"]
    lines.append(
        Line(
            only_lo or None if config.network else only_lo,
            "network: "
            + ("none (loopback only)" if only_lo else f"interfaces {', '.join(facts['ifaces'])}")
            + (" (--network shares the host's)" if config.network else ""),
        )
    )
    cap_eff, cap_bnd = st.get("CapEff", "?"), st.get("CapBnd", "?")
    no_caps = cap_eff == "0000000000000000"
    lines.append(
        Line(
            no_caps and st.get("NoNewPrivs") == "1",
            f"capabilities: CapEff {cap_eff}, CapBnd {cap_bnd}; no_new_privs "
            f"{st.get('NoNewPrivs', '?')}",
        )
    )
    outside = ", ".join(host["uids"]) or "?"
    unprivileged = "0" not in host["uids"] and host["uids"] != []
    lines.append(
        Line(
            unprivileged,
            f"sandbox uid: {outside} on the host, {facts['uid']} inside "
            f"({jail.privilege.describe()})",
        )
    )
    filtered = st.get("Seccomp") == "2"
    lines.append(
        Line(
            filtered,
            f"seccomp: {seccomp.describe() if filtered else 'no filter'} "
            f"(Seccomp: {st.get('Seccomp', '?')}, filters: {st.get('Seccomp_filters', '?')})",
        )
    )
    cg = host["cgroup"]
    memory = cg.get("memory.limit_in_bytes") or cg.get("memory.max")
    if memory and memory.isdigit():
        lines.append(
            Line(
                True,
                f"memory: cgroup {cgroups.version}, {human_bytes(int(memory))} per sandbox; "
                "an out-of-memory kill ends the sandbox with that cause",
            )
        )
    else:
        lines.append(
            Line(
                False,
                f"memory: no memory cgroup; RLIMIT_AS {rl.get('Max address space', '?')} "
                "per process only",
            )
        )
    pids = cg.get("pids.max")
    nproc = rl.get("Max processes", "?")
    nproc_note = "void: uid 0" if "0" in host["uids"] else "per sandbox"
    lines.append(
        Line(
            pids is not None,
            f"processes and threads: pids.max {pids or 'none'} (cgroup), RLIMIT_NPROC "
            f"{nproc} ({nproc_note})",
        )
    )
    cpus = _cpu_quota(cg)
    weighted = "cpu.shares" in cg or "cpu.weight" in cg
    if cpus is not None:
        lines.append(Line(True, f"CPU: quota {cpus:g} CPU per sandbox (cgroup)"))
    elif weighted:
        lines.append(
            Line(
                lim.cpus <= 0,  # a quota was asked for but is not there
                "CPU: fair share (one cgroup per sandbox, equal weight); no quota",
            )
        )
    else:
        lines.append(Line(False, "CPU: no cpu cgroup (shared per process, not per sandbox)"))
    cpu_time = rl.get("Max cpu time", "?")
    lines.append(
        Line(
            None if lim.cpu_time <= 0 else cpu_time != "unlimited",
            f"CPU time per process: RLIMIT_CPU {cpu_time}",
        )
    )
    lines.append(
        Line(
            True,
            f"wall time per exec: {lim.exec_timeout_default:g} s by default, the exec "
            f"'timeout' field up to {lim.exec_timeout_max:g} s",
        )
    )
    lines.append(Line(True, f"open files: RLIMIT_NOFILE {rl.get('Max open files', '?')}"))
    fsize = rl.get("Max file size", "?")
    lines.append(
        Line(
            fsize != "unlimited",
            f"file size: RLIMIT_FSIZE {_bytes_text(fsize)}; core dumps "
            f"{rl.get('Max core file size', '?')}",
        )
    )
    lines.append(
        Line(
            bwrap and facts["tmp"] is not None,
            f"/tmp: tmpfs {_size(facts['tmp'])}, /dev/shm: tmpfs {_size(facts['shm'])}"
            if bwrap
            else "/tmp: the host's (no private /tmp without bwrap)",
        )
    )
    lines.append(
        Line(
            bwrap,
            f"workspace: tmpfs {_size(facts['workspace'])} (counts toward memory)"
            if bwrap
            else "workspace: a host directory without a size limit",
        )
    )
    lines.append(
        Line(
            True,
            f"admission: at most {lim.max_sandboxes} sandboxes and "
            f"{human_bytes(lim.max_total_memory)} of memory requests at once "
            f"({human_bytes(min(lim.memory_request, lim.memory))} each, "
            f"limit {human_bytes(lim.memory)})",
        )
    )
    importable = "importable" if facts["ipython"] else "NOT importable"
    lines.append(Line(facts["ipython"], f"sandbox Python: {sys.executable}, IPython {importable}"))
    return lines


def _size(n: int | None) -> str:
    return human_bytes(n) if n else "?"


def _bytes_text(value: str) -> str:
    return human_bytes(int(value)) if value.isdigit() else value
