"""Files that come back, and a sandbox that looks like the notebook's folder.

What a cell writes in the sandbox's working folder is copied into the notebook's
folder on the host before the cell's reply (``modbox_kernel/filesync.py``), so batch
runs end with their outputs in place, as under python3. Every differential test runs
the same cells under both kernels, each in a copy of the same folder, and compares
outputs and files. The hostile cells run on a service of their own whose file-size
limit lets a sandbox make a 2 GB (sparse) file.
"""

from __future__ import annotations

import hashlib
import pwd
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from kernel_helpers import (
    KERNEL_NAME,
    REFERENCE_KERNEL,
    STARTUP_TIMEOUT,
    env_for_kernel,
    execute_notebook,
    normalise_notebook,
    only_modbox,
    run_cell,
    service_env,
    start_kernel,
    stop_kernel,
)
from service_helpers import LocalService, start_local_service, stop_local_service_process

pytestmark = pytest.mark.kernel

# The notebook of a batch run: it reads its input and writes three outputs, one in a
# subfolder, and prints each output's hash as the kernel that wrote it sees it.
BATCH_CELLS = [
    "import hashlib, os\nimport pandas as pd\n"
    "frame = pd.read_csv('input.csv')\nframe['y'] = frame['x'] ** 2",
    "frame.to_csv('results.csv', index=False)",
    "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
    "fig, ax = plt.subplots(figsize=(3, 2))\nax.plot(frame['x'], frame['y'])\n"
    "fig.savefig('plot.png', dpi=50, metadata={'Software': None})\nplt.close(fig)",
    "os.makedirs('sub', exist_ok=True)\n"
    "with open('sub/model.bin', 'wb') as f:\n    f.write(bytes(range(256)) * 4096)",
    "for name in ('results.csv', 'plot.png', 'sub/model.bin'):\n"
    "    print(name, hashlib.sha256(open(name, 'rb').read()).hexdigest())",
]
OUTPUTS = ("results.csv", "plot.png", "sub/model.bin")


def _notebook(*cells: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in cells]
    return nb


def _batch_folder(where: Path) -> Path:
    where.mkdir(parents=True)
    (where / "input.csv").write_text("x\n1\n2\n3\n")
    nbformat.write(_notebook(*BATCH_CELLS), str(where / "batch.ipynb"))
    return where


def _tool(args: list[str], env: dict[str, str], cwd: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("tool", ["papermill", "nbconvert"])
def test_a_batch_run_leaves_the_files_it_wrote_as_under_python3(
    request: pytest.FixtureRequest, tmp_path: Path, tool: str
) -> None:
    files = {}
    for name in (REFERENCE_KERNEL, KERNEL_NAME):
        folder = _batch_folder(tmp_path / name)
        env = env_for_kernel(request, name)
        if tool == "papermill":
            args = ["papermill", "-k", name, "batch.ipynb", "batch-out.ipynb"]
        else:
            args = [
                "jupyter",
                "nbconvert",
                "--to=notebook",
                "--execute",
                f"--ExecutePreprocessor.kernel_name={name}",
                f"--ExecutePreprocessor.startup_timeout={STARTUP_TIMEOUT}",
                "--output=batch-out",
                "batch.ipynb",
            ]
        _tool(args, env, folder)
        executed = nbformat.read(str(folder / "batch-out.ipynb"), as_version=4)
        printed = "".join(o.get("text", "") for o in executed.cells[-1].outputs)
        # What the kernel saw it write is what is on the host, byte for byte.
        seen = dict(line.split() for line in printed.splitlines())
        on_host = _hashes(folder)
        assert {k: on_host[k] for k in OUTPUTS} == seen, (name, printed)
        files[name] = {k: v for k, v in on_host.items() if not k.endswith(".ipynb")}
    assert files[KERNEL_NAME] == files[REFERENCE_KERNEL]
    assert set(OUTPUTS) <= set(files[KERNEL_NAME])


def _listing_notebook() -> nbformat.NotebookNode:
    return _notebook(
        "import os\nsorted(os.listdir('.'))",
        "open('a.txt', 'w').write('written')\nsorted(os.listdir('.'))",
        "sorted(os.listdir('sub'))",
        "import getpass, pwd\n"
        "user = getpass.getuser()\n"
        "print(user == pwd.getpwuid(os.getuid()).pw_name)\n"
        "print(os.path.isdir(os.path.expanduser('~')))",
        "import subprocess\n"
        "print(subprocess.run(['whoami'], capture_output=True, text=True).stdout.strip()"
        " == user)",
    )


def test_the_working_folder_shows_the_notebooks_files_and_a_named_user(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    results = {}
    for name in (REFERENCE_KERNEL, KERNEL_NAME):
        folder = tmp_path / name / "lesson"
        (folder / "sub").mkdir(parents=True)
        (folder / "data.csv").write_text("x\n1\n")
        (folder / "sub" / "inner.txt").write_text("inner\n")
        nbformat.write(nbformat.v4.new_notebook(), str(folder / "lesson.ipynb"))
        executed = execute_notebook(
            _listing_notebook(), name, env_for_kernel(request, name), folder
        )
        results[name] = normalise_notebook(executed)
        assert (folder / "a.txt").read_text() == "written", name
    assert results[KERNEL_NAME] == results[REFERENCE_KERNEL]
    first = results[KERNEL_NAME][0]["outputs"][0]["execute_result"]["text/plain"]
    assert first == "['data.csv', 'lesson.ipynb', 'sub']"
    assert results[KERNEL_NAME][3]["outputs"] == [{"stream": {"stdout": "True\nTrue\n"}}]


@only_modbox("the sandbox's own account list is what modbox-python adds")
def test_the_hosts_account_names_are_not_readable_in_the_sandbox(
    request: pytest.FixtureRequest, require_isolation: None
) -> None:
    km, kc = start_kernel(KERNEL_NAME, env_for_kernel(request))
    try:
        run = run_cell(kc, "print(open('/etc/passwd').read() + open('/etc/group').read())")
        assert run.status == "ok", run.describe()
    finally:
        stop_kernel(km, kc)
    inside = {line.split(":")[0] for line in run.stdout.splitlines() if ":" in line}
    host = {entry.pw_name for entry in pwd.getpwall()} - {"root", "nobody"}
    assert inside & host == set(), inside
    assert "sandbox" in inside


def test_a_notebook_in_a_repository_reads_sibling_folders_as_under_python3(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    nb = _notebook(
        "print(open('../data/x.csv').read(), end='')",
        "import os\nos.makedirs('../results', exist_ok=True)\n"
        "open('../results/out.txt', 'w').write('from the notebook')",
        # (.git is hidden: hidden files are never copied into a sandbox)
        "sorted(p for p in os.listdir('..') if not p.startswith('.'))",
    )
    results = {}
    for name in (REFERENCE_KERNEL, KERNEL_NAME):
        repo = tmp_path / name / "repo"
        (repo / ".git").mkdir(parents=True)
        (repo / "data").mkdir()
        (repo / "data" / "x.csv").write_text("a,b\n1,2\n")
        (repo / "notebooks").mkdir()
        executed = execute_notebook(nb, name, env_for_kernel(request, name), repo / "notebooks")
        results[name] = normalise_notebook(executed)
        assert (repo / "results" / "out.txt").read_text() == "from the notebook", name
    assert results[KERNEL_NAME] == results[REFERENCE_KERNEL]
    assert results[KERNEL_NAME][0]["outputs"] == [{"stream": {"stdout": "a,b\n1,2\n"}}]


# --------------------------------------------------------------------------- hostile


@pytest.fixture(scope="module")
def big_files_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalService]:
    """A service whose sandboxes may write files up to 4 GiB (sparse ones fit its tmpfs)."""
    log = tmp_path_factory.mktemp("big-files-service") / "service.log"
    service = start_local_service(log, "--fsize-mib", "4096")
    try:
        yield service
    finally:
        stop_local_service_process(service.process)


@pytest.fixture
def hostile(tmp_path: Path, big_files_service: LocalService) -> Iterator[tuple[Any, Path, Path]]:
    """A modbox kernel in ``folder``, beside a folder ``outside`` it must never touch."""
    if KERNEL_NAME == REFERENCE_KERNEL:
        pytest.skip("hostile sync-back is about modbox-python")
    folder, outside = tmp_path / "notebook", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    (folder / "data.csv").write_text("x\n1\n")
    (folder / "linked").symlink_to(outside)  # a link on the host side
    env = service_env(big_files_service.base_url, big_files_service.token)
    km, kc = start_kernel(KERNEL_NAME, env, cwd=folder)
    try:
        first = run_cell(kc, "import os", timeout=STARTUP_TIMEOUT)
        assert first.status == "ok", first.describe()
        yield kc, folder, outside
    finally:
        stop_kernel(km, kc)


def _notices(run: Any) -> list[str]:
    return [line for line in run.stderr.splitlines() if line.startswith("Modbox:")]


@pytest.mark.timeout(300)
def test_hostile_cells_write_nothing_outside_the_folder_and_each_gets_one_notice(
    hostile: tuple[Any, Path, Path],
) -> None:
    kc, folder, outside = hostile
    before = {p.name for p in folder.iterdir()}
    links = run_cell(
        kc,
        "os.symlink('/etc/passwd', 'passwd_link')\nos.symlink('../../outside', 'out_link')\n"
        "os.symlink('/etc', 'etc_dir')",
    )
    assert links.status == "ok", links.describe()
    (notice,) = _notices(links)
    assert "links" in notice and "passwd_link" in notice and "out_link" in notice

    fifo = run_cell(kc, "os.mkfifo('pipe')")
    (notice,) = _notices(fifo)
    assert "not regular files" in notice and "pipe" in notice

    huge = run_cell(kc, "with open('huge.bin', 'wb') as f:\n    f.truncate(2 * 1024**3)")
    assert huge.status == "ok", huge.describe()
    (notice,) = _notices(huge)
    assert "MODBOX_SYNC_FILE_LIMIT" in notice and "huge.bin" in notice

    # Through a folder that is a link on the host, and with '..' in a (legal) name.
    through = run_cell(
        kc,
        "os.makedirs('linked', exist_ok=True)\nopen('linked/planted.txt', 'w').write('x')\n"
        "open('a..b.txt', 'w').write('dots')",
    )
    (notice,) = _notices(through)
    assert "linked/planted.txt" in notice and "link" in notice

    t0 = time.monotonic()
    many = run_cell(
        kc,
        "os.makedirs('many')\nfor i in range(100_000):\n    open(f'many/{i}', 'w').close()",
        timeout=240,
    )
    took = time.monotonic() - t0
    assert many.status == "ok", many.describe()
    (notice,) = _notices(many)
    assert "more than 20000" in notice and "%modbox pull" in notice
    quick = run_cell(kc, "1 + 1")
    assert quick.status == "ok" and _notices(quick) == [], quick.describe()
    print(f"\n100,000 files: the cell took {took:.1f} s")

    assert list(outside.iterdir()) == []
    after = {p.name for p in folder.iterdir()}
    assert after - before == {"a..b.txt"}, after
    assert (folder / "a..b.txt").read_text() == "dots"
    assert (folder / "linked").is_symlink()


def test_a_host_file_changed_after_the_copy_is_not_overwritten(
    hostile: tuple[Any, Path, Path],
) -> None:
    kc, folder, _ = hostile
    (folder / "data.csv").write_text("changed on the host\n")
    run = run_cell(kc, "open('data.csv', 'w').write('written in the sandbox\\n')")
    assert run.status == "ok", run.describe()
    (notice,) = _notices(run)
    assert "data.csv" in notice and "changed since" in notice and "%modbox pull" in notice
    assert (folder / "data.csv").read_text() == "changed on the host\n"
    # Asked for by name, the sandbox's version replaces the host's.
    pulled = run_cell(kc, "%modbox pull data.csv")
    assert pulled.status == "ok", pulled.describe()
    assert (folder / "data.csv").read_text() == "written in the sandbox\n"


# --------------------------------------------------------------------------- %modbox


@pytest.fixture
def magic_kernel(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Any, Path]]:
    if KERNEL_NAME == REFERENCE_KERNEL:
        pytest.skip("%modbox is modbox-python's own magic")
    folder = tmp_path / "nb"
    folder.mkdir()
    (folder / "here.txt").write_text("here\n")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "one.txt").write_text("one\n")
    (tmp_path / "elsewhere" / "two.txt").write_text("two\n")
    env = {**env_for_kernel(request), "MODBOX_SYNC_FILE_LIMIT": "1000"}
    km, kc = start_kernel(KERNEL_NAME, env, cwd=folder)
    try:
        yield kc, folder
    finally:
        stop_kernel(km, kc)


def test_modbox_status_names_the_sandbox_and_what_it_uses(magic_kernel: tuple[Any, Path]) -> None:
    kc, folder = magic_kernel
    sandbox = run_cell(kc, "import os\nprint(os.environ['MODBOX_SANDBOX_ID'])", timeout=120)
    run = run_cell(kc, "%modbox")
    assert run.status == "ok", run.describe()
    fields = dict(line.split(":", 1) for line in run.stdout.splitlines())
    fields = {k: v.strip() for k, v in fields.items()}
    assert fields["sandbox"] == sandbox.stdout.strip()
    assert fields["Python"].startswith(".".join(map(str, sys.version_info[:2])))
    assert fields["host folder"] == str(folder.resolve())
    assert fields["memory used"].endswith(")") and fields["CPU used"].endswith(" s")
    assert "MODBOX_SYNC=cell" in fields["files back"]
    assert {"backend", "image", "uptime", "TTL left"} <= set(fields)


def test_modbox_pull_and_push_copy_what_sync_does_not(magic_kernel: tuple[Any, Path]) -> None:
    kc, folder = magic_kernel
    big = run_cell(kc, "import os\nopen('big.bin', 'wb').write(b'x' * 5000)", timeout=120)
    assert "MODBOX_SYNC_FILE_LIMIT" in big.stderr and not (folder / "big.bin").exists()
    pulled = run_cell(kc, "%modbox pull big.bin")
    assert pulled.status == "ok", pulled.describe()
    assert (folder / "big.bin").read_bytes() == b"x" * 5000
    assert "1 file" in pulled.stdout

    made = run_cell(
        kc, "os.makedirs('/tmp/made/deep')\nopen('/tmp/made/deep/f.txt', 'w').write('f')"
    )
    assert made.status == "ok", made.describe()
    folder_pull = run_cell(kc, "%modbox pull /tmp/made --to out")
    assert folder_pull.status == "ok", folder_pull.describe()
    assert (folder / "out" / "made" / "deep" / "f.txt").read_text() == "f"

    pushed = run_cell(kc, "%modbox push ../elsewhere")
    assert pushed.status == "ok", pushed.describe()
    seen = run_cell(kc, "print(sorted(os.listdir('elsewhere')), open('elsewhere/two.txt').read())")
    assert seen.stdout == "['one.txt', 'two.txt'] two\n\n", seen.describe()
    # Pushed files are the host's own: they are not copied back as if a cell wrote them.
    assert not (folder / "elsewhere").exists()


def test_modbox_errors_say_what_is_wrong_and_the_kernel_goes_on(
    magic_kernel: tuple[Any, Path],
) -> None:
    kc, folder = magic_kernel
    cases = {
        "%modbox pull no-such-file": "no-such-file: No such file or directory",
        "%modbox push no-such-file": "no such file or folder on the host",
        "%modbox pull here.txt --to ../..": "is outside the notebook's folder",
        "%modbox frobnicate": "no command 'frobnicate'",
        "%modbox pull": "needs at least one PATH",
        "x = 1\n%modbox": "put %modbox lines in a cell of their own",
    }
    for code, said in cases.items():
        run = run_cell(kc, code, timeout=120)
        assert run.status == "error", (code, run.describe())
        assert said in run.describe(), (code, run.describe())
    # --to ../.. named the folder two above the notebook's: nothing was written there.
    assert not (folder.parent.parent / "here.txt").exists()
    assert sorted(p.name for p in folder.iterdir()) == ["here.txt"]
    assert run_cell(kc, "print('alive')").stdout == "alive\n"


def test_modbox_completes_and_explains_itself(magic_kernel: tuple[Any, Path]) -> None:
    kc, _ = magic_kernel
    assert run_cell(kc, "1", timeout=120).status == "ok"
    commands = kc.complete("%modbox pu", 10, reply=True, timeout=30)["content"]
    assert commands["matches"] == ["pull", "push"] and commands["cursor_start"] == 8
    host = kc.complete("%modbox push he", 15, reply=True, timeout=30)["content"]
    assert host["matches"] == ["here.txt"]
    inside = kc.complete("%modbox pull he", 15, reply=True, timeout=30)["content"]
    assert "here.txt" in inside["matches"]  # the sandbox's copy, completed there
    helped = kc.inspect("%modbox", 3, reply=True, timeout=30)["content"]
    assert helped["found"] and "%modbox pull PATH" in helped["data"]["text/plain"]
    page = run_cell(kc, "%modbox?")
    payload = page.reply["content"]["payload"]
    assert payload and "%modbox push PATH" in payload[0]["data"]["text/plain"]


def test_shutdown_mode_brings_files_back_when_the_kernel_stops(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    if KERNEL_NAME == REFERENCE_KERNEL:
        pytest.skip("MODBOX_SYNC is modbox-python's setting")
    env = {**env_for_kernel(request), "MODBOX_SYNC": "shutdown"}
    km, kc = start_kernel(KERNEL_NAME, env, cwd=tmp_path)
    try:
        run = run_cell(kc, "open('late.txt', 'w').write('at the end')", timeout=120)
        assert run.status == "ok" and run.stderr == "", run.describe()
        assert not (tmp_path / "late.txt").exists()  # not after the cell
    finally:
        stop_kernel(km, kc)
    assert (tmp_path / "late.txt").read_text() == "at the end"
