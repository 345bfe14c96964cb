"""The sandbox runtime API of the local service: exec and files, for real.

Every test talks to the real service (``local_service``) over HTTP and runs real
commands in a real sandbox; process checks look at the host's /proc.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from service_helpers import (
    LocalSandbox,
    LocalService,
    create_sandbox,
    destroy_sandbox,
    host_pids_of,
    running_sandbox,
)

MIB = 1024 * 1024


# ----------------------------------------------------------------------------- exec


def test_exec_reports_streams_exit_code_and_duration(local_sandbox: LocalSandbox) -> None:
    result = local_sandbox.exec("echo out; echo err >&2; exit 7")
    assert result["exitCode"] == 7
    assert result["stdout"] == "out\n"
    assert result["stderr"] == "err\n"
    assert isinstance(result["durationMs"], int) and result["durationMs"] >= 0
    assert result["timedOut"] is False and result["truncated"] is False


def test_exec_runs_bash_in_the_workspace(local_sandbox: LocalSandbox) -> None:
    result = local_sandbox.exec(
        'echo "$BASH_VERSION"; pwd; echo "$HOME"; echo "$MODBOX_SANDBOX_ID"'
    )
    bash_version, cwd, home, sandbox_id = result["stdout"].splitlines()
    assert bash_version
    assert cwd == home
    assert sandbox_id == local_sandbox.id
    if local_sandbox.service.isolation == "bwrap":
        assert cwd == "/workspace"


def test_exec_passes_arbitrary_bytes_of_shell_text(local_sandbox: LocalSandbox) -> None:
    text = "quotes ' \" backslash \\ dollar $HOME backtick ` unicode ü€"
    result = local_sandbox.exec(f"cat <<'EOF'\n{text}\nEOF")
    assert result["stdout"] == text + "\n"
    invalid = local_sandbox.exec(r"printf 'a\377b'")
    assert invalid["stdout"] == "a\ufffdb"  # undecodable bytes become U+FFFD


def test_exec_environment_is_cleared_plus_env_vars(local_service: LocalService) -> None:
    env_vars = {"GREETING": "hello world", "SANDBOX_API_KEY": "k-123"}
    with running_sandbox(local_service, env_vars=env_vars) as sandbox:
        names = set(sandbox.exec("env -0 | tr '\\0' '\\n' | cut -d= -f1")["stdout"].split())
        allowed = {
            "PATH", "HOME", "LANG", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
            "MODBOX_SANDBOX_ID", "GREETING", "SANDBOX_API_KEY",
            # pip installs into the writable workspace (docs/local-service.md)
            "PIP_PREFIX", "PYTHONPATH", "PIP_DISABLE_PIP_VERSION_CHECK", "PIP_RETRIES",
            # the sandbox's own account, as its /etc/passwd names it (bwrap jails)
            "USER", "LOGNAME",
            # the memory cgroup's limit, which the jail cannot see (usage figures)
            "MODBOX_MEMORY_LIMIT",
            # set by bash itself
            "PWD", "SHLVL", "_", "OLDPWD",
        }  # fmt: skip
        assert names <= allowed, names - allowed
        assert sandbox.exec('echo "$GREETING"')["stdout"] == "hello world\n"
        python = sandbox.exec("python3 -c 'import sys; print(sys.version_info[:2])'")
        assert python["exitCode"] == 0, python


def test_sandbox_python_has_the_service_packages(local_sandbox: LocalSandbox) -> None:
    result = local_sandbox.exec(
        "python3 -c 'import IPython, pandas, matplotlib, numpy; print(\"ok\")'"
    )
    assert result["exitCode"] == 0, result["stderr"]
    assert result["stdout"] == "ok\n"


def test_timeout_kills_the_command_and_its_process_group(local_sandbox: LocalSandbox) -> None:
    started = time.monotonic()
    result = local_sandbox.exec("sleep 60 & echo $! > bg.pid; echo before; sleep 60", timeout=1)
    assert time.monotonic() - started < 15
    assert result["exitCode"] == 124
    assert result["timedOut"] is True
    assert result["stdout"] == "before\n"
    assert "timed out after 1 s" in result["stderr"]
    # The background sleep was in the same process group: gone too.
    check = local_sandbox.exec("kill -0 $(cat bg.pid) 2>/dev/null && echo alive || echo gone")
    assert check["stdout"] == "gone\n"


def test_output_is_capped_per_stream_with_a_marker(local_sandbox: LocalSandbox) -> None:
    cap = 16 * MIB
    result = local_sandbox.exec(f"head -c {cap + 1000} /dev/zero | tr '\\0' a; echo small >&2")
    assert result["exitCode"] == 0
    assert result["truncated"] is True
    assert result["stdout"].startswith("a" * 1000)
    body, marker = result["stdout"][:cap], result["stdout"][cap:]
    assert body == "a" * cap
    assert "stdout truncated: 1000 more bytes not shown" in marker
    assert result["stderr"] == "small\n"  # the other stream has its own cap


def test_exec_returns_while_a_background_child_holds_stdout(local_sandbox: LocalSandbox) -> None:
    started = time.monotonic()
    result = local_sandbox.exec("nohup sleep 30 & echo $! > nohup.pid; echo started")
    assert time.monotonic() - started < 5
    assert result["exitCode"] == 0
    assert result["stdout"] == "started\n"
    local_sandbox.exec("kill $(cat nohup.pid)")


def test_background_process_survives_and_is_visible_to_later_execs(
    fresh_sandbox: LocalSandbox,
) -> None:
    started = fresh_sandbox.exec("nohup sleep 300 >/dev/null 2>&1 & echo $!")
    pid = started["stdout"].strip()
    assert pid.isdigit()
    seen = fresh_sandbox.exec(f"tr '\\0' ' ' < /proc/{pid}/cmdline; echo; ps -e -o pid=,comm=")
    assert seen["exitCode"] == 0
    lines = seen["stdout"].splitlines()
    assert lines[0].strip() == "sleep 300"
    assert any(line.split() == [pid, "sleep"] for line in lines[1:])


def test_concurrent_execs_do_not_wait_for_each_other(local_sandbox: LocalSandbox) -> None:
    slow: dict[str, float] = {}

    def run_slow() -> None:
        local_sandbox.exec("sleep 2")
        slow["done"] = time.monotonic()

    thread = threading.Thread(target=run_slow)
    thread.start()
    time.sleep(0.3)
    fast = local_sandbox.exec("echo fast")
    fast_done = time.monotonic()
    thread.join()
    assert fast["stdout"] == "fast\n"
    assert fast_done < slow["done"] - 1


def test_commands_longer_than_one_argv_string_run(local_sandbox: LocalSandbox) -> None:
    payload = "x" * 300_000  # over Linux's 128 KiB MAX_ARG_STRLEN
    result = local_sandbox.exec(f"v='{payload}'; echo ${{#v}}")
    assert result["exitCode"] == 0, result["stderr"][:500]
    assert result["stdout"] == "300000\n"


# ---------------------------------------------------------------------------- files


def _upload(sandbox: LocalSandbox, name: str, content: bytes) -> httpx.Response:
    return sandbox.http.post(f"{sandbox.files_url}/upload", files={"file": (name, content)})


def test_upload_then_cat(local_sandbox: LocalSandbox) -> None:
    name = f"hello-{uuid.uuid4().hex[:6]}.txt"
    uploaded = _upload(local_sandbox, name, b"hello from upload\n")
    assert uploaded.status_code == 200, uploaded.text
    answer = uploaded.json()
    assert answer["success"] is True and answer["size"] == 18
    assert answer["path"].endswith(f"/uploads/{name}")
    if local_sandbox.service.isolation == "bwrap":
        assert answer["path"] == f"/workspace/uploads/{name}"
    assert local_sandbox.exec(f"cat {answer['path']}")["stdout"] == "hello from upload\n"
    assert local_sandbox.exec(f"cat uploads/{name}")["stdout"] == "hello from upload\n"


def test_upload_uses_the_basename_and_replaces(local_sandbox: LocalSandbox) -> None:
    assert (
        _upload(local_sandbox, "../../dir/evil.txt", b"one")
        .json()["path"]
        .endswith("/uploads/evil.txt")
    )
    assert _upload(local_sandbox, "evil.txt", b"two").status_code == 200
    assert local_sandbox.exec("cat uploads/evil.txt")["stdout"] == "two"


def test_files_list_download_delete(local_sandbox: LocalSandbox) -> None:
    name = f"data-{uuid.uuid4().hex[:6]}.bin"
    content = bytes(range(256)) * 1000
    assert _upload(local_sandbox, name, content).status_code == 200
    http, files = local_sandbox.http, local_sandbox.files_url

    listing = http.get(files, params={"path": "uploads"})
    assert listing.status_code == 200
    entries = {e["name"]: e for e in listing.json()["entries"]}
    assert entries[name]["type"] == "file" and entries[name]["size"] == len(content)
    assert entries[name]["path"].endswith(f"/uploads/{name}")

    root = http.get(files).json()
    assert "uploads" in {e["name"] for e in root["entries"]}

    download = http.get(f"{files}/download", params={"path": f"uploads/{name}"})
    assert download.status_code == 200
    assert download.content == content

    # A file written by a command is reachable by its absolute in-sandbox path too.
    local_sandbox.exec("mkdir -p out && printf result > out/r.txt")
    absolute = entries[name]["path"].rsplit("/uploads/", 1)[0] + "/out/r.txt"
    assert http.get(f"{files}/download", params={"path": absolute}).content == b"result"

    deleted = http.delete(files, params={"path": f"uploads/{name}"})
    assert deleted.status_code == 200 and deleted.json()["success"] is True
    assert local_sandbox.exec(f"test -e uploads/{name} && echo yes || echo no")["stdout"] == "no\n"
    missing = http.get(f"{files}/download", params={"path": f"uploads/{name}"})
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    not_empty = http.delete(files, params={"path": "out"})
    assert not_empty.status_code == 409


@pytest.fixture
def host_canary(tmp_path: Path) -> Iterator[Path]:
    canary = tmp_path / "host-secret.txt"
    canary.write_text("HOST SECRET")
    yield canary


def test_symlinks_planted_in_the_workspace_are_never_followed(
    fresh_sandbox: LocalSandbox, host_canary: Path
) -> None:
    http, files = fresh_sandbox.http, fresh_sandbox.files_url
    host_dir = host_canary.parent
    setup = fresh_sandbox.exec(
        f"ln -s {host_canary} uploads/link && ln -s / rootlink && ln -s {host_dir} hostdir "
        f"&& mkfifo uploads/fifo && echo ok"
    )
    assert setup["stdout"] == "ok\n", setup

    def assert_refused(response: httpx.Response, *codes: int) -> None:
        assert response.status_code in codes, response.text
        assert "HOST SECRET" not in response.text
        assert response.json()["error"]["code"] in ("conflict", "forbidden", "not_found")

    download = f"{files}/download"
    assert_refused(http.get(download, params={"path": "uploads/link"}), 409)
    assert_refused(http.get(download, params={"path": f"hostdir/{host_canary.name}"}), 409)
    assert_refused(http.get(download, params={"path": f"rootlink{host_canary}"}), 409)
    assert_refused(http.get(download, params={"path": "uploads/fifo"}), 409)
    assert_refused(http.get(download, params={"path": f"../../../..{host_canary}"}), 403)
    assert_refused(http.get(download, params={"path": str(host_canary)}), 403)
    assert_refused(http.get(files, params={"path": "rootlink"}), 409)
    assert_refused(http.get(files, params={"path": "hostdir"}), 409)
    assert_refused(http.delete(files, params={"path": f"hostdir/{host_canary.name}"}), 409)

    listing = http.get(files, params={"path": "uploads"}).json()
    kinds = {e["name"]: e["type"] for e in listing["entries"]}
    assert kinds["link"] == "symlink" and kinds["fifo"] == "other"

    # Uploading over a planted link replaces the link; the host file is untouched.
    assert _upload(fresh_sandbox, "link", b"replaced").status_code == 200
    assert host_canary.read_text() == "HOST SECRET"
    assert fresh_sandbox.exec("test -L uploads/link || cat uploads/link")["stdout"] == "replaced"

    # Deleting a link removes the link, not its target.
    assert http.delete(files, params={"path": "hostdir"}).status_code == 200
    assert host_canary.read_text() == "HOST SECRET"

    # With uploads/ itself replaced by a link to a host directory, uploads are refused.
    fresh_sandbox.exec(f"rm -rf uploads && ln -s {host_dir} uploads")
    refused = _upload(fresh_sandbox, "planted.txt", b"x")
    assert refused.status_code == 409, refused.text
    assert not (host_dir / "planted.txt").exists()
    assert sorted(p.name for p in host_dir.iterdir()) == [host_canary.name]


# -------------------------------------------------------------------------- destroy


def test_destroy_kills_every_process_of_the_sandbox(local_service: LocalService) -> None:
    sandbox = create_sandbox(local_service)
    sandbox.exec("nohup sleep 300 >/dev/null 2>&1 &")
    sandbox.exec("setsid sleep 301 >/dev/null 2>&1 < /dev/null &")  # escapes the group
    sandbox.exec("(trap '' TERM HUP; exec sleep 302) >/dev/null 2>&1 &")  # ignores signals
    before = host_pids_of(sandbox.id)
    assert len(before) >= 4, before  # supervisor, three sleeps (and bwrap, when used)

    destroy_sandbox(sandbox)
    assert host_pids_of(sandbox.id) == set()

    with local_service.client() as control:
        detail = control.get(f"/sandboxes/{sandbox.id}").json()
    assert detail["status"] == "destroyed"
    gone = httpx.post(
        sandbox.exec_url,
        json={"command": "true"},
        headers={"Authorization": f"Bearer {sandbox.access_token}"},
    )
    assert gone.status_code == 404
    assert gone.json()["error"]["code"] == "sandbox_not_found"


def test_a_sandbox_that_dies_is_reported_destroyed(local_service: LocalService) -> None:
    with running_sandbox(local_service) as sandbox:
        # Killing the supervisor (bash's parent) from the inside takes the sandbox down.
        gone = sandbox.http.post(sandbox.exec_url, json={"command": "kill -9 $PPID; sleep 5"})
        assert gone.status_code in (200, 404), gone.text
        with local_service.client() as control:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                detail = control.get(f"/sandboxes/{sandbox.id}").json()
                if detail["status"] == "destroyed":
                    break
                time.sleep(0.1)
        assert detail["status"] == "destroyed", detail
        assert detail["error"]
        assert host_pids_of(sandbox.id) == set()
