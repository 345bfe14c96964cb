"""Hostile notebooks against the local backend: the local cases of docs/isolation.md.

Each test plays one case of the catalogue through the runtime exec API (``python3 -c``
scripts, as a notebook's code would run) against a service with tight limits, asserts
the safe outcome, and ends with :func:`assert_back_to_baseline`: the victim sandbox is
destroyed and then no process of its pid namespace, no process carrying its id, no
cgroup of it is left on the host, no process of the sandbox uid exists beyond the
bystander's, the service answers within 2 s and the *bystander* (a sandbox that lives
for the whole module) still runs a command within 2 s.

The cases that need their own service (43: unusable bwrap; 44: SIGKILL of the service)
start one. They need bubblewrap: with ``MODBOX_REQUIRE_ISOLATION=1`` (CI) a service
without it fails them, elsewhere they skip with the reason.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from service_helpers import (
    LocalSandbox,
    LocalService,
    create_sandbox,
    host_pids_of,
    pid_namespace,
    processes_in_pid_namespace,
    processes_of_uid,
    require_bwrap,
    running_local_service,
    running_sandbox,
    sandbox_cgroup_dirs,
    wait_until,
)

pytestmark = [pytest.mark.isolation]

SANDBOX_UID = 64123  # this module's service only, so its processes can be counted
MEMORY_MIB = 256
PIDS = 64
TMP_MIB = 64
WORKSPACE_MIB = 64
FSIZE_MIB = 32
NOFILE = 256
TIGHT_LIMITS = (
    "--memory-mib", str(MEMORY_MIB),
    "--pids", str(PIDS),
    "--tmp-mib", str(TMP_MIB),
    "--workspace-mib", str(WORKSPACE_MIB),
    "--fsize-mib", str(FSIZE_MIB),
    "--nofile", str(NOFILE),
    "--cpus", "0.5",
    "--exec-timeout", "60",
    "--sandbox-uid", str(SANDBOX_UID),
)  # fmt: skip
CANARY_ENV = "MODBOX_TEST_ADVERSARIAL_CANARY"
RESPONSIVE_S = 2.0
NEEDS_BWRAP = "no usable bwrap; set MODBOX_REQUIRE_ISOLATION=1 to make this a failure"


def _py(script: str) -> str:
    """A bash line running ``script`` with ``python3 -c`` (no shell interpretation)."""
    return f"python3 -c {shlex.quote(script)}"


@dataclass
class Tenant:
    """A sandbox under test, with its pid namespace (to find its processes on the host)."""

    sandbox: LocalSandbox
    pid_ns: str

    @property
    def id(self) -> str:
        return self.sandbox.id


@pytest.fixture(scope="module")
def hostile_service(
    tmp_path_factory: pytest.TempPathFactory, canary: str
) -> Iterator[LocalService]:
    env = {**os.environ, CANARY_ENV: canary, "MODBOX_LOCAL_TOKEN": f"token-{canary}"}
    log = tmp_path_factory.mktemp("adversarial") / "service.log"
    with running_local_service(log, *TIGHT_LIMITS, env=env) as service:
        require_bwrap(service, NEEDS_BWRAP)
        yield service


@pytest.fixture(scope="module")
def bystander(hostile_service: LocalService) -> Iterator[Tenant]:
    """Another student's sandbox, alive for the whole module, with files of its own."""
    with running_sandbox(hostile_service, task_id="bystander") as sandbox:
        sandbox.exec("echo bystander-secret > homework.txt && echo bystander-tmp > /tmp/b.txt")
        yield Tenant(sandbox, pid_namespace(sandbox))


@pytest.fixture
def victim(hostile_service: LocalService, bystander: Tenant) -> Iterator[Tenant]:
    # Destroyed on exit too: idempotent, the test's baseline check did it already.
    with running_sandbox(hostile_service) as sandbox:
        yield Tenant(sandbox, pid_namespace(sandbox))


def assert_back_to_baseline(service: LocalService, bystander: Tenant, victim: Tenant) -> None:
    with service.client() as control:
        # DELETE answers once every process is dead and the cgroup and workspace are gone.
        assert control.delete(f"/sandboxes/{victim.id}").json() == {"success": True}
        started = time.monotonic()
        health = control.get("/health")
        assert health.status_code == 200 and time.monotonic() - started < RESPONSIVE_S
    # Killed processes can take a moment to finish exiting on a loaded host, and a jail
    # that ended by itself leaves bwrap's pid 1 as a zombie for the service (a child
    # subreaper) to reap within its reaper interval: a leak is what is still there 2 s on.
    assert _settles(lambda: processes_in_pid_namespace(victim.pid_ns)) == set()
    assert _settles(lambda: host_pids_of(victim.id)) == set()
    assert sandbox_cgroup_dirs(service.pid, victim.id) == []
    if os.geteuid() == 0:

        def stray() -> set[int]:
            allowed = processes_in_pid_namespace(bystander.pid_ns) | host_pids_of(bystander.id)
            return processes_of_uid(SANDBOX_UID) - allowed

        left = _settles(stray)
        assert left == set(), [_describe(pid) for pid in left]
    started = time.monotonic()
    assert bystander.sandbox.exec("echo ok")["stdout"] == "ok\n"
    assert time.monotonic() - started < RESPONSIVE_S


def _settles(probe: Callable[[], set[int]], within: float = 2.0) -> set[int]:
    """``probe()`` once it is empty, or what it still finds after ``within`` seconds."""
    deadline = time.monotonic() + within
    found = probe()
    while found and time.monotonic() < deadline:
        time.sleep(0.05)
        found = probe()
    return found


def _describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f"{pid}: {f.read()[:120]}"
    except OSError:
        return f"{pid}: gone"


# ------------------------------------------------------------------ time (1, 4)


def test_01_busy_loop_hits_the_wall_limit_and_neighbours_stay_fast(
    hostile_service: LocalService, bystander: Tenant, victim: Tenant
) -> None:
    result: dict[str, object] = {}

    def spin() -> None:
        result.update(victim.sandbox.exec(_py("while True: pass"), timeout=3))

    spinner = threading.Thread(target=spin)
    spinner.start()
    time.sleep(1)  # the loop is running now
    latencies = []
    for _ in range(3):
        started = time.monotonic()
        assert bystander.sandbox.exec("echo ok")["stdout"] == "ok\n"
        latencies.append(time.monotonic() - started)
    spinner.join(30)
    assert result["timedOut"] is True and result["exitCode"] == 124, result
    assert result["limitReached"] == "time_limit"
    assert "timed out after 3 s" in str(result["stderr"])
    assert max(latencies) < 0.5, latencies
    assert_back_to_baseline(hostile_service, bystander, victim)


def test_04_sleep_hits_the_wall_limit_without_using_cpu(
    hostile_service: LocalService, bystander: Tenant, victim: Tenant
) -> None:
    started = time.monotonic()
    result = victim.sandbox.exec(_py("import time; time.sleep(10**6)"), timeout=1.5)
    assert result["timedOut"] is True and result["exitCode"] == 124, result
    assert time.monotonic() - started < 5
    assert_back_to_baseline(hostile_service, bystander, victim)


# ------------------------------------------------------- processes (5, 6, 7, 42)


FORK_BOMB = """
import os, time
children = 0
try:
    while True:
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        children += 1
except OSError as e:
    print(children, type(e).__name__, e.strerror, flush=True)
"""


def test_05_06_fork_bomb_is_bounded_per_sandbox(
    hostile_service: LocalService, bystander: Tenant, victim: Tenant
) -> None:
    bomb = victim.sandbox.exec(_py(FORK_BOMB), timeout=30)
    children, error, reason = bomb["stdout"].split(" ", 2)
    assert error == "BlockingIOError" and reason.strip() == "Resource temporarily unavailable"
    assert 0 < int(children) < PIDS
    assert bomb["limitReached"] == "process_limit"
    assert "reached its process limit (64 processes and threads)" in bomb["stderr"]
    # The sleeping children still hold every slot, on the host too, and nothing more.
    assert PIDS - 10 < len(processes_in_pid_namespace(victim.pid_ns)) <= PIDS
    # Case 6: another sandbox of the same host uid can still fork meanwhile.
    forked = bystander.sandbox.exec(_py("import subprocess; print(subprocess.run(['true']))"))
    assert "returncode=0" in forked["stdout"], forked
    assert_back_to_baseline(hostile_service, bystander, victim)


def test_07_thread_bomb_is_bounded(
    hostile_service: LocalService, bystander: Tenant, victim: Tenant
) -> None:
    script = (
        "import threading, time\n"
        "n = 0\n"
        "try:\n"
        "    while True:\n"
        "        threading.Thread(target=time.sleep, args=(99,), daemon=True).start()\n"
        "        n += 1\n"
        "except RuntimeError as e:\n"
        "    print(n, e)\n"
    )
    result = victim.sandbox.exec(_py(script), timeout=30)
    count, message = result["stdout"].split(" ", 1)
    assert message.strip() == "can't start new thread", result
    assert 0 < int(count) < PIDS
    assert result["limitReached"] == "process_limit"
    assert_back_to_baseline(hostile_service, bystander, victim)


def test_42_root_service_runs_sandboxes_unprivileged_with_nproc_enforced(
    hostile_service: LocalService, bystander: Tenant, victim: Tenant
) -> None:
    if os.geteuid() != 0:
        pytest.skip("the service runs as a normal user here; the root case needs root")
    status = victim.sandbox.exec("grep -E '^(Uid|CapEff|CapBnd|NoNewPrivs):' /proc/self/status")
    fields = {k: v.split() for k, v in (ln.split(":", 1) for ln in status["stdout"].splitlines())}
    assert fields["Uid"] == [str(SANDBOX_UID)] * 4
    assert fields["CapEff"] == ["0000000000000000"] and fields["CapBnd"] == ["0000000000000000"]
    assert fields["NoNewPrivs"] == ["1"]
    host_uids = set()
    for pid in processes_in_pid_namespace(victim.pid_ns):
        with open(f"/proc/{pid}/status") as f:
            host_uids |= {ln.split()[1] for ln in f if ln.startswith("Uid:")}
    assert host_uids == {str(SANDBOX_UID)}
    # RLIMIT_NPROC works because the uid is not 0 (for root it is void): 8 processes
    # under a limit of 5, far below pids.max, fail.
    script = (
        "import resource, subprocess\n"
        "resource.setrlimit(resource.RLIMIT_NPROC, (5, 5))\n"
        "procs = []\n"
        "try:\n"
        "    for _ in range(8):\n"
        "        procs.append(subprocess.Popen(['sleep', '30']))\n"
        "except OSError as e:\n"
        "    print(len(procs), e.strerror)\n"
        "for p in procs:\n"
        "    p.kill()\n"
    )
    result = victim.sandbox.exec(_py(script))
    started, reason = result["stdout"].split(" ", 1)
    assert int(started) < 5 and reason.strip() == "Resource temporarily unavailable", result
    assert_back_to_baseline(hostile_service, bystander, victim)


# ---------------------------------------------------------------- memory (8)


def test_08_huge_allocation_is_a_memory_error(
    hostile_service: LocalService, bystander: Tenant, victim: Tenant
) -> None:
    result = victim.sandbox.exec(_py("x = bytearray(10**11)"))
    assert result["exitCode"] == 1 and result["stderr"].rstrip().endswith("MemoryError")
    assert victim.sandbox.exec("echo alive")["stdout"] == "alive\n"
    assert_back_to_baseline(hostile_service, bystander, victim)


def test_08_filling_memory_ends_the_sandbox_with_the_cause(
    hostile_service: LocalService, bystander: Tenant, victim: Tenant
) -> None:
    hog = victim.sandbox.post_exec(_py("b = [bytearray(10**6) for _ in range(10**4)]"))
    assert hog.status_code == 404, hog.text
    expected = f"out of memory (limit {MEMORY_MIB} MiB)"
    assert hog.json()["error"]["message"] == f"Sandbox {victim.id} was destroyed: {expected}."
    later = victim.sandbox.post_exec("echo again")
    assert later.status_code == 404 and expected in later.json()["error"]["message"]
    with hostile_service.client() as control:
        detail = control.get(f"/sandboxes/{victim.id}").json()
    assert detail["status"] == "destroyed" and detail["error"] == expected
    assert_back_to_baseline(hostile_service, bystander, victim)


# ------------------------------------------------------------ disk (10, 11, 13)


def test_10_filling_tmp_stops_at_its_size(
    hostile_service: LocalService, bystander: Tenant, victim: Tenant
) -> None:
    script = (
        "import errno\n"
        "written = 0\n"
        "try:\n"
        "    for i in range(100):\n"
        "        with open(f'/tmp/fill{i}', 'wb') as f:\n"
        "            for _ in range(16):\n"
        "                f.write(b'x' * (1 << 20))\n"
        "                written += 1 << 20\n"
        "except OSError as e:\n"
        "    print(errno.errorcode[e.errno], written >> 20)\n"
    )
    result = victim.sandbox.exec(_py(script))
    code, mib = result["stdout"].split()
    assert code == "ENOSPC", result
    assert TMP_MIB - 2 <= int(mib) <= TMP_MIB
    # The host's /tmp got none of it: the sandbox's /tmp is a tmpfs of its own.
    assert not list(Path("/tmp").glob("fill*"))
    assert_back_to_baseline(hostile_service, bystander, victim)


def test_11_big_files_stop_at_the_file_size_limit_and_the_workspace_quota(
    hostile_service: LocalService, bystander: Tenant, victim: Tenant
) -> None:
    one_file = (
        "try:\n"
        f"    open('big', 'wb').write(b'x' * ({FSIZE_MIB + 1} << 20))\n"
        "except OSError as e:\n"
        "    print(e.strerror)\n"
    )
    assert victim.sandbox.exec(_py(one_file))["stdout"] == "File too large\n"
    c_program = victim.sandbox.exec(f"head -c {FSIZE_MIB + 1}M /dev/zero > big2")
    assert c_program["exitCode"] == 153, c_program  # SIGXFSZ for programs that do not ignore it
    victim.sandbox.exec("rm -f big big2")
    many_files = (
        "import errno, os\n"
        "try:\n"
        "    for i in range(100):\n"
        "        with open(f'part{i}', 'wb') as f:\n"
        "            f.write(b'x' * (8 << 20))\n"
        "except OSError as e:\n"
        "    st = os.statvfs('.')\n"
        "    print(errno.errorcode[e.errno], (st.f_blocks * st.f_frsize) >> 20)\n"
    )
    result = victim.sandbox.exec(_py(many_files))
    assert result["stdout"] == f"ENOSPC {WORKSPACE_MIB}\n", result
    assert_back_to_baseline(hostile_service, bystander, victim)


def test_13_open_files_stop_at_the_limit(
    hostile_service: LocalService, bystander: Tenant, victim: Tenant
) -> None:
    script = (
        "import os\n"
        "fds = []\n"
        "try:\n"
        "    while True:\n"
        "        fds.append(os.open('/dev/null', os.O_RDONLY))\n"
        "except OSError as e:\n"
        "    print(len(fds), e.strerror)\n"
    )
    count, message = victim.sandbox.exec(_py(script))["stdout"].split(" ", 1)
    assert message.strip() == "Too many open files"
    assert NOFILE - 10 < int(count) < NOFILE
    assert_back_to_baseline(hostile_service, bystander, victim)


# ------------------------------------------------- what a sandbox can see (17, 18, 22, 27, 36)


def test_17_host_secrets_and_homes_are_not_there(
    hostile_service: LocalService, bystander: Tenant, victim: Tenant
) -> None:
    canary = Path.home() / f"modbox-canary-{uuid.uuid4().hex}"
    canary.write_text("host secret")
    try:
        script = (
            "import glob, os\n"
            f"paths = ['/etc/shadow', {str(canary)!r}, '/root/.ssh', '/home']\n"
            "print([os.path.exists(p) for p in paths])\n"
            "print(glob.glob('/root/*') + glob.glob('/home/*/.ssh/*'))\n"
        )
        result = victim.sandbox.exec(_py(script))
        assert result["stdout"] == "[False, False, False, False]\n[]\n", result
    finally:
        canary.unlink()
    assert_back_to_baseline(hostile_service, bystander, victim)


def _python_mounts_in(directory: str) -> list[str]:
    """Entries of ``directory`` inside a jail that only exist as mount points.

    The sandbox's Python (this venv and its base) is bound read-only at its host
    path; when that path lies under ``directory`` (a CI checkout in /tmp, say), the
    jail's fresh tmpfs there shows the first component of it, and nothing else.
    """
    names = set()
    for prefix in {os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix)}:
        rel = os.path.relpath(prefix, directory)
        if not rel.startswith(".."):
            names.add(rel.split(os.sep)[0])
    return sorted(names)


def test_18_other_sandboxes_files_are_invisible(
    hostile_service: LocalService, bystander: Tenant, victim: Tenant
) -> None:
    script = (
        "import os, sys\n"
        "for d in ['..', '/', '/tmp', '/home', '/var', '/var/tmp', '/workspace']:\n"
        "    print(d, sorted(os.listdir(d)) if os.path.isdir(d) else None)\n"
        "# Everything but /proc and the read-only system and Python trees.\n"
        "skip = ('/proc', '/usr', *map(os.path.realpath, (sys.prefix, sys.base_prefix)))\n"
        "hits = []\n"
        "for root, dirs, files in os.walk('/', onerror=lambda e: None):\n"
        "    dirs[:] = [d for d in dirs if not os.path.join(root, d).startswith(skip)]\n"
        "    hits += [os.path.join(root, f) for f in files if f in ('homework.txt', 'b.txt')]\n"
        "print('hits', hits)\n"
    )
    result = victim.sandbox.exec(_py(script))
    lines = dict(line.split(" ", 1) for line in result["stdout"].splitlines())
    assert lines["hits"] == "[]", result
    assert lines["/tmp"] == str(_python_mounts_in("/tmp"))
    assert lines["/workspace"] == "['uploads']"
    assert "bystander" not in result["stdout"]
    assert_back_to_baseline(hostile_service, bystander, victim)


def test_22_system_directories_are_read_only(
    hostile_service: LocalService, bystander: Tenant, victim: Tenant
) -> None:
    script = (
        "for p in ['/usr/x', '/etc/x', '/x', '/opt/x', '/bin/x']:\n"
        "    try:\n"
        "        open(p, 'w')\n"
        "        print('WROTE', p)\n"
        "    except OSError as e:\n"
        "        print(e.strerror)\n"
    )
    result = victim.sandbox.exec(_py(script))
    assert result["stdout"].splitlines() == ["Read-only file system"] * 5, result
    assert_back_to_baseline(hostile_service, bystander, victim)


def test_27_proc_shows_only_the_sandbox(
    hostile_service: LocalService, bystander: Tenant, victim: Tenant
) -> None:
    script = (
        "import os\n"
        "pids = [p for p in os.listdir('/proc') if p.isdigit()]\n"
        "cmds = [open(f'/proc/{p}/cmdline', 'rb').read().replace(b'\\0', b' ') for p in pids]\n"
        "print(len(pids))\n"
        "print(b'\\n'.join(cmds).decode())\n"
    )
    result = victim.sandbox.exec(_py(script))
    count, *cmdlines = result["stdout"].splitlines()
    assert int(count) < 10, result
    text = "\n".join(cmdlines)
    assert "pytest" not in text and "modbox_kernel.local" not in text
    assert str(hostile_service.pid) not in victim.sandbox.exec("ls /proc")["stdout"].split()
    users = set(victim.sandbox.exec("ps -e -o uid=")["stdout"].split())
    assert users == {str(SANDBOX_UID) if os.geteuid() == 0 else str(os.getuid())}
    assert_back_to_baseline(hostile_service, bystander, victim)


def test_36_scratch_files_do_not_outlive_their_sandbox(
    hostile_service: LocalService, bystander: Tenant, victim: Tenant
) -> None:
    marker = f"left-behind-{uuid.uuid4().hex}"
    victim.sandbox.exec(f"for d in /tmp /dev/shm /var/tmp .; do echo x > $d/{marker}; done")
    assert_back_to_baseline(hostile_service, bystander, victim)
    with running_sandbox(hostile_service) as successor:
        found = successor.exec(f"ls /tmp/{marker} /dev/shm/{marker} /var/tmp/{marker} {marker}")
        assert found["exitCode"] != 0 and marker not in found["stdout"], found


# ---------------------------------------------------------- files API (19, 20)


def test_19_download_and_upload_never_follow_planted_links(
    hostile_service: LocalService, bystander: Tenant, victim: Tenant
) -> None:
    http, files = victim.sandbox.http, victim.sandbox.files_url
    setup = victim.sandbox.exec(
        "ln -s /etc/passwd results.txt && ln -s /etc etc && echo mine > own.txt "
        "&& ln own.txt hardlink.txt && ln -s /etc/passwd uploads/data.csv && echo ok"
    )
    assert setup["stdout"] == "ok\n", setup
    for path, status in [
        ("results.txt", 409),
        ("etc/passwd", 409),
        ("hardlink.txt", 409),
        ("../../../../etc/passwd", 403),
        ("/etc/passwd", 403),
    ]:
        answer = http.get(f"{files}/download", params={"path": path})
        assert answer.status_code == status, (path, answer.text)
        assert "root:" not in answer.text
    assert "hard links" in http.get(f"{files}/download", params={"path": "hardlink.txt"}).text
    # Uploading over the planted link replaces the link inside the workspace.
    passwd = Path("/etc/passwd").read_bytes()
    upload = http.post(f"{files}/upload", files={"file": ("data.csv", b"a,b\n")})
    assert upload.status_code == 200, upload.text
    assert Path("/etc/passwd").read_bytes() == passwd
    check = victim.sandbox.exec("test -L uploads/data.csv && echo link || cat uploads/data.csv")
    assert check["stdout"] == "a,b\n"
    owner = victim.sandbox.exec("stat -c %u uploads/data.csv")["stdout"].strip()
    assert owner == (str(SANDBOX_UID) if os.geteuid() == 0 else str(os.getuid()))
    assert_back_to_baseline(hostile_service, bystander, victim)


def test_20_links_planted_for_the_teardown_touch_nothing_on_the_host(
    hostile_service: LocalService, bystander: Tenant, victim: Tenant, tmp_path: Path
) -> None:
    target = tmp_path / "host-dir"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    target.chmod(0o700)
    victim.sandbox.exec(
        f"ln -s {target} hostdir && ln -s {target}/keep.txt uploads/keep.txt "
        f"&& rm -rf uploads && ln -s {target} uploads"
    )
    http, files = victim.sandbox.http, victim.sandbox.files_url
    refused = http.post(f"{files}/upload", files={"file": ("x.txt", b"x")})
    assert refused.status_code == 409, refused.text
    deleted = http.delete(files, params={"path": "hostdir"})
    assert deleted.status_code == 200  # the link itself
    assert_back_to_baseline(hostile_service, bystander, victim)  # destroy: the teardown
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]
    assert (target / "keep.txt").read_text() == "keep"
    assert oct(target.stat().st_mode & 0o777) == "0o700" and target.stat().st_uid == os.getuid()


# A fake agent for case 45: it listens on st/agent.sock in the sandbox, records every
# line it gets and answers each with one line of its own.
_FAKE_AGENT = """
import os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind("st/agent.sock")
s.listen()
if os.fork():
    sys.exit(0)
os.setsid()
for fd in (0, 1, 2):
    os.close(fd)
while True:
    c, _ = s.accept()
    line = c.makefile("rb").readline()
    with open("st/got", "ab") as f:
        f.write(line)
    c.sendall(b'{"ok": true, "fake": true}\\n')
    c.close()
"""


def test_45_the_agent_route_follows_no_planted_link_to_a_socket_or_token(
    hostile_service: LocalService, bystander: Tenant, victim: Tenant
) -> None:
    """The service connects to the agent's socket in the workspace itself: a symlink
    there must never lead it to a host socket, nor a linked token file make it send a
    file of the sandbox's choosing (it falls back to the supervisor, in the jail)."""
    # Where the sandbox's user could reach it, so only the link check can refuse it.
    host_dir = Path(tempfile.mkdtemp(prefix="modbox-host-socket-", dir="/tmp"))
    host_dir.chmod(0o755)
    host_socket = host_dir / "host.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(host_socket))
    listener.listen()
    if os.geteuid() == 0:
        os.chown(host_socket, SANDBOX_UID, SANDBOX_UID)
    listener.settimeout(0.5)
    url = victim.sandbox.exec_url.rsplit("/", 1)[0] + "/agent"
    request = "e30="  # {}

    def ask() -> httpx.Response:
        return victim.sandbox.http.post(
            url, json={"state_dir": "/workspace/st", "request": request}
        )

    try:
        setup = victim.sandbox.exec(
            f"mkdir st && ln -s {host_socket} st/agent.sock && echo t > st/token"
        )
        assert setup["exitCode"] == 0, setup
        refused = ask()
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"]["code"] == "agent_unreachable"
        with pytest.raises(TimeoutError):
            listener.accept()  # the host's socket was never reached
        # A real socket of the sandbox's, but the token file a link: nothing is sent.
        victim.sandbox.exec("rm -rf st && mkdir st && ln -s /etc/hostname st/token")
        started = victim.sandbox.exec(_py(_FAKE_AGENT))
        assert started["exitCode"] == 0, started
        assert ask().status_code == 409
        assert victim.sandbox.exec("cat st/got 2>/dev/null; echo end")["stdout"] == "end\n"
        # With a token file of its own, the line goes to that socket and back as is.
        victim.sandbox.exec("rm st/token && echo own-token > st/token")
        answered = ask()
        assert answered.status_code == 200, answered.text
        assert answered.json() == {"ok": True, "fake": True}
        assert victim.sandbox.exec("cat st/got")["stdout"] == f"own-token {request}\n"
    finally:
        listener.close()
        shutil.rmtree(host_dir)
    assert_back_to_baseline(hostile_service, bystander, victim)


# ---------------------------------------------------------- network (23, 24, 39)


def test_23_24_no_route_to_the_host_the_service_or_the_internet(
    hostile_service: LocalService, bystander: Tenant, victim: Tenant
) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        service_port = int(hostile_service.base_url.rsplit(":", 1)[1])
        targets = [
            ("127.0.0.1", listener.getsockname()[1]),
            ("127.0.0.1", service_port),
            ("169.254.169.254", 80),
            ("8.8.8.8", 53),
        ]
        script = (
            "import socket\n"
            f"for host, port in {targets!r}:\n"
            "    try:\n"
            "        socket.create_connection((host, port), timeout=2).close()\n"
            "        print('CONNECTED')\n"
            "    except OSError as e:\n"
            "        print(type(e).__name__)\n"
            "try:\n"
            "    socket.getaddrinfo('example.com', 80)\n"
            "    print('RESOLVED')\n"
            "except OSError as e:\n"
            "    print('dns', type(e).__name__)\n"
        )
        result = victim.sandbox.exec(_py(script))
        assert result["stdout"].splitlines() == [
            "ConnectionRefusedError",
            "ConnectionRefusedError",
            "OSError",  # ENETUNREACH: there is no route at all
            "OSError",
            "dns gaierror",
        ], result
    finally:
        listener.close()
    assert_back_to_baseline(hostile_service, bystander, victim)


def test_39_service_requests_without_the_token_or_with_a_foreign_host(
    hostile_service: LocalService, bystander: Tenant, victim: Tenant
) -> None:
    base = hostile_service.base_url
    assert httpx.get(f"{base}/sandboxes").status_code == 401
    wrong = httpx.get(f"{base}/sandboxes", headers={"Authorization": "Bearer wrong"})
    assert wrong.status_code == 401
    good = {"Authorization": f"Bearer {hostile_service.token}"}
    rebound = httpx.get(f"{base}/sandboxes", headers={**good, "Host": "evil.example"})
    assert rebound.status_code == 403, rebound.text
    assert rebound.json()["error"]["code"] == "forbidden"
    foreign = httpx.post(
        victim.sandbox.exec_url,
        json={"command": "echo x"},
        headers={"Authorization": f"Bearer {victim.sandbox.access_token}", "Host": "a.b:80"},
    )
    assert foreign.status_code == 403
    assert httpx.get(f"{base}/sandboxes", headers=good).status_code == 200
    assert_back_to_baseline(hostile_service, bystander, victim)


# ------------------------------------------------------ secrets and privilege (26, 29, 30, 31)


def test_26_service_environment_and_token_are_invisible(
    hostile_service: LocalService, bystander: Tenant, victim: Tenant, canary: str
) -> None:
    script = (
        "import os, glob\n"
        "print(sorted(os.environ))\n"
        "blobs = []\n"
        "for path in glob.glob('/proc/*/environ') + glob.glob('/proc/*/cmdline'):\n"
        "    try:\n"
        "        blobs.append(open(path, 'rb').read().decode(errors='replace'))\n"
        "    except OSError:\n"
        "        pass\n"
        "print('\\n'.join(blobs))\n"
    )
    result = victim.sandbox.exec(_py(script))
    assert canary not in result["stdout"]
    assert CANARY_ENV not in result["stdout"] and "MODBOX_LOCAL_TOKEN" not in result["stdout"]
    assert hostile_service.token not in result["stdout"]
    assert_back_to_baseline(hostile_service, bystander, victim)


def test_29_no_new_user_namespaces(
    hostile_service: LocalService, bystander: Tenant, victim: Tenant
) -> None:
    script = (
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "print(libc.unshare(0x10000000), os.strerror(ctypes.get_errno()))\n"
    )
    result = victim.sandbox.exec(_py(script))
    assert result["stdout"] == "-1 Operation not permitted\n", result
    assert victim.sandbox.exec("unshare -Ur true")["exitCode"] != 0
    assert_back_to_baseline(hostile_service, bystander, victim)


SYSCALL_PROBE = """
import ctypes, errno
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def call(nr, *args):
    ctypes.set_errno(0)
    libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    return errno.errorcode.get(ctypes.get_errno(), "ok")
probes = {
    "keyctl": (250, 0, 0, 0, 0, 0),
    "ptrace_attach": (101, 16, 1, 0, 0),
    "perf_event_open": (298, 0, 0, -1, -1, 0),
    "mount": (165, 0, 0, 0, 0, 0),
    "chroot": (161, 0),
    "bpf": (321, 0, 0, 0),
    "clone_newns": (56, 0x20000 | 17, 0, 0, 0, 0),
    "clone3": (435, 0, 0),
    "io_uring_setup": (425, 1, 0),
    "tiocsti": (16, 0, 0x5412, 0),
    "tiocsti_high_bits": (16, 0, 0x100005412, 0),
    "packet_socket": (41, 17, 3, 0),
    # Control cases: allowed syscalls fail for their own reasons (bad pointer) or work.
    "chmod_bad_pointer": (90, 0, 0),
    "getppid": (110,),
}
for name, (nr, *args) in probes.items():
    print(name, call(nr, *args))
"""


def test_30_seccomp_blocks_the_dangerous_syscalls(
    hostile_service: LocalService, bystander: Tenant, victim: Tenant
) -> None:
    machine = os.uname().machine
    if machine != "x86_64":
        pytest.skip(f"the seccomp filter knows x86_64 syscall numbers only, not {machine}'s")
    result = victim.sandbox.exec(_py(SYSCALL_PROBE))
    errnos = dict(line.split() for line in result["stdout"].splitlines())
    assert errnos == {
        "keyctl": "EPERM",
        "ptrace_attach": "EPERM",
        "perf_event_open": "EPERM",
        "mount": "EPERM",
        "chroot": "EPERM",
        "bpf": "EPERM",
        "clone_newns": "EPERM",
        "clone3": "ENOSYS",
        "io_uring_setup": "ENOSYS",
        "tiocsti": "EPERM",
        "tiocsti_high_bits": "EPERM",
        "packet_socket": "EAFNOSUPPORT",
        "chmod_bad_pointer": "EFAULT",
        "getppid": "ok",
    }, result
    status = victim.sandbox.exec("grep -E '^Seccomp:' /proc/self/status")["stdout"]
    assert status.split() == ["Seccomp:", "2"]
    assert_back_to_baseline(hostile_service, bystander, victim)


def test_31_setuid_programs_grant_nothing(
    hostile_service: LocalService, bystander: Tenant, victim: Tenant
) -> None:
    result = victim.sandbox.exec(
        "su -c 'id -u' root </dev/null; echo su=$?; "
        "(sudo -n true) 2>/dev/null; echo sudo=$?; "
        "passwd -S root >/dev/null 2>&1; echo passwd=$?; "
        "grep -c nosuid /proc/self/mountinfo; grep -vc nosuid /proc/self/mountinfo; "
        "grep NoNewPrivs /proc/self/status"
    )
    lines = result["stdout"].splitlines()
    assert lines[0] == "su=1" and lines[1] != "sudo=0" and lines[2] != "passwd=0", result
    assert int(lines[3]) > 5 and lines[4] == "0", result  # every mount is nosuid
    assert lines[5].split() == ["NoNewPrivs:", "1"]
    assert_back_to_baseline(hostile_service, bystander, victim)


# ----------------------------------------------------------- crashes and kills (28, 32)


def test_28_kill_everything_ends_only_that_sandbox_with_the_cause(
    hostile_service: LocalService, bystander: Tenant, victim: Tenant
) -> None:
    victim.sandbox.exec("nohup sleep 300 >/dev/null 2>&1 &")
    answer = victim.sandbox.post_exec(_py("import os; os.kill(-1, 9)"))
    assert answer.status_code == 404, answer.text
    message = answer.json()["error"]["message"]
    assert "killed with SIGKILL (signal 9)" in message and "os.kill(-1, 9)" in message
    assert_back_to_baseline(hostile_service, bystander, victim)


def test_32_segfault_is_reported_and_leaves_no_core(
    hostile_service: LocalService, bystander: Tenant, victim: Tenant
) -> None:
    crash = victim.sandbox.exec(_py("import ctypes; ctypes.string_at(0)"))
    assert crash["exitCode"] == 139, crash  # 128 + SIGSEGV
    listing = victim.sandbox.exec("ls -A . /tmp")["stdout"].split()
    assert listing == [".:", "uploads", "/tmp:", *_python_mounts_in("/tmp")]
    limit = victim.sandbox.exec("grep 'Max core file size' /proc/self/limits")["stdout"]
    assert limit.split()[4:6] == ["0", "0"], limit
    assert victim.sandbox.exec("echo alive")["stdout"] == "alive\n"
    assert_back_to_baseline(hostile_service, bystander, victim)


# ------------------------------------------------------------------ the host (43, 44)


def _env_without_required_isolation() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "MODBOX_REQUIRE_ISOLATION"}


def _run_service(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modbox_kernel.local", "--port", "0", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_43_unusable_bwrap_is_a_startup_error_when_isolation_is_required(
    tmp_path: Path,
) -> None:
    broken = tmp_path / "bwrap"
    # Passes the flag probe (it prints the real help) but cannot build a jail.
    broken.write_text(
        '#!/bin/sh\nif [ "$1" = --help ]; then exec bwrap --help; fi\n'
        'echo "bwrap: No permissions to create new namespace" >&2; exit 1\n'
    )
    broken.chmod(0o755)
    for args in (
        ("--isolation", "bwrap", "--bwrap", str(tmp_path / "missing")),
        ("--isolation", "bwrap", "--bwrap", "/bin/true"),
        ("--isolation", "bwrap", "--bwrap", str(broken)),
    ):
        done = _run_service(*args, env=_env_without_required_isolation())
        assert done.returncode == 2, (args, done.stderr)
        assert done.stdout == ""
        assert "--isolation bwrap was requested but bubblewrap cannot isolate" in done.stderr
    required = {**os.environ, "MODBOX_REQUIRE_ISOLATION": "1"}
    missing = _run_service("--bwrap", str(tmp_path / "missing"), env=required)
    assert missing.returncode == 2 and "MODBOX_REQUIRE_ISOLATION=1 is set" in missing.stderr
    assert "does not exist" in missing.stderr
    probe_failed = _run_service("--bwrap", str(broken), env=required)
    assert probe_failed.returncode == 2
    assert "No permissions to create new namespace" in probe_failed.stderr


def test_43_auto_without_usable_bwrap_says_so_loudly(tmp_path: Path) -> None:
    broken = tmp_path / "bwrap"
    broken.write_text('#!/bin/sh\nif [ "$1" = --help ]; then exec bwrap --help; fi\nexit 1\n')
    broken.chmod(0o755)
    with running_local_service(
        tmp_path / "service.log", "--bwrap", str(broken), env=_env_without_required_isolation()
    ) as service:
        assert service.isolation == "none"
        assert httpx.get(f"{service.base_url}/health").json()["isolation"] == "none"
        log = service.log_text()
        assert "!!! NO ISOLATION" in log and "isolation: none" in log


def test_44_sigkill_of_the_service_mid_command_leaves_nothing(tmp_path: Path) -> None:
    # Left by the kill below; stopped on exit only if the test fails before it.
    with running_local_service(tmp_path / "first.log", *TIGHT_LIMITS) as service:
        require_bwrap(service, NEEDS_BWRAP)
        sandboxes = [create_sandbox(service) for _ in range(2)]
        namespaces = [pid_namespace(s) for s in sandboxes]
        for sandbox in sandboxes:
            sandbox.exec("nohup sleep 300 >/dev/null 2>&1 & setsid sleep 301 >/dev/null 2>&1 &")

        # A command is running (mid-cell) when the service dies.
        def mid_cell() -> None:
            with contextlib.suppress(httpx.TransportError):
                sandboxes[0].post_exec("sleep 30")

        running = threading.Thread(target=mid_cell, daemon=True)
        running.start()
        time.sleep(0.5)  # the mid-cell command is running
        # bwrap's pid 1, bash's background children and the running command: the exec
        # returns before its background children are necessarily visible, so wait.
        assert wait_until(
            lambda: all(len(processes_in_pid_namespace(ns)) >= 4 for ns in namespaces), 10, 0.05
        ), [processes_in_pid_namespace(ns) for ns in namespaces]
        state_line = next(ln for ln in service.log_text().splitlines() if "state dir " in ln)
        state_dir = Path(state_line.split("state dir ", 1)[1].split(";", 1)[0])
        os.kill(service.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        service.process.wait(10)
        while time.monotonic() - killed_at < 1.0 and any(
            processes_in_pid_namespace(ns) for ns in namespaces
        ):
            time.sleep(0.02)
        assert [processes_in_pid_namespace(ns) for ns in namespaces] == [set(), set()]
        assert time.monotonic() - killed_at < 1.0
        for sandbox in sandboxes:
            assert host_pids_of(sandbox.id) == set()
            sandbox.close()
    # The next start reaps what the killed service could not remove.
    with running_local_service(tmp_path / "second.log"):
        assert not state_dir.exists()
        assert all(sandbox_cgroup_dirs(service.pid, s.id) == [] for s in sandboxes)
