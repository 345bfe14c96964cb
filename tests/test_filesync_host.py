"""The host side of files coming back, against an agent that lies.

The agent runs where the notebook's code runs, so what it says about files (names,
sizes, contents) is untrusted: ``modbox_kernel/hostfiles.py`` and ``filesync.py``
check everything on the host. A real agent never sends these answers, which is why
a scripted channel stands in for it here (the kernel tests run the real one).
"""

from __future__ import annotations

import asyncio
import base64
import os
from pathlib import Path
from typing import Any

import pytest

from modbox_kernel.filesync import FileSync, SyncSettings
from modbox_kernel.foldercopy import Placed
from modbox_kernel.hostfiles import Conflict, HostFolder, Refused, safe_parts


class LyingChannel:
    """Answers ``read`` with ``contents[path]`` (cut at ``chunk``), ``workdir`` with ok."""

    def __init__(self, contents: dict[str, bytes], chunk: int = 1 << 20) -> None:
        self.contents = contents
        self.chunk = chunk
        self.requests: list[dict[str, Any]] = []

    async def request(self, payload: dict[str, Any], *, read_timeout: float = 30) -> Any:
        self.requests.append(payload)
        if payload["op"] != "read":
            return {"ok": True}
        item = payload["files"][0]
        data = self.contents[item["path"]][item["offset"] : item["offset"] + self.chunk]
        done = item["offset"] + len(data) >= len(self.contents[item["path"]])
        encoded = base64.b64encode(data).decode()
        return {"ok": True, "chunks": [{"path": item["path"], "data": encoded, "eof": done}]}


def _sync(tmp_path: Path, channel: LyingChannel, **limits: int) -> FileSync:
    sync = FileSync(SyncSettings(**limits))
    folder = tmp_path / "notebook"
    folder.mkdir(exist_ok=True)
    placed = Placed(root="/workspace/notebook", cwd="/workspace/notebook", host_root=str(folder))
    asyncio.run(sync.enter(channel, placed))  # type: ignore[arg-type]
    return sync


@pytest.mark.parametrize(
    "name",
    [
        "../escape.txt",
        "/etc/passwd",
        "sub/../../x",
        "",
        "a//b",
        ".bashrc",
        "sub/.git/config",
        "x\x00y",
        "a/" + "n" * 300,
        ".",
        "sub/.",
    ],
)
def test_names_that_leave_the_folder_or_hide_are_refused(name: str) -> None:
    with pytest.raises(Refused):
        safe_parts(name)


def test_names_with_dots_inside_are_fine() -> None:
    assert safe_parts("a..b.txt") == ("a..b.txt",)
    assert safe_parts("sub/x.csv") == ("sub", "x.csv")


def test_a_lying_agent_writes_only_what_may_be_written(tmp_path: Path) -> None:
    names = ["../escape.txt", "/tmp/abs.txt", "sub/../../x.txt", ".hidden", "ok.txt"]
    contents = {f"/workspace/notebook/{n}": b"data" for n in names}
    contents["/workspace/notebook/liar.bin"] = b"y" * (3 << 20)  # said: 10 bytes
    channel = LyingChannel(contents)
    sync = _sync(tmp_path, channel)
    changed = [{"path": n, "size": 4} for n in names] + [{"path": "liar.bin", "size": 10}]
    notices = asyncio.run(sync.after_cell({"changed": changed, "skipped": []}))
    folder = tmp_path / "notebook"
    assert sorted(os.listdir(folder)) == ["ok.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notebook"]
    (notice,) = notices
    for name in ("../escape.txt", "/tmp/abs.txt", "sub/../../x.txt", ".hidden"):
        assert name in notice
    assert "liar.bin" in notice and "grew past" in notice
    # The liar was cut off after its first chunk, not read to its end.
    assert sum(r.get("op") == "read" for r in channel.requests) == 2


def test_caps_per_file_and_per_cell_name_their_settings(tmp_path: Path) -> None:
    contents = {f"/workspace/notebook/f{i}": b"z" * 100 for i in range(5)}
    sync = _sync(tmp_path, LyingChannel(contents), file_limit=150, cell_limit=250)
    changed = [{"path": f"f{i}", "size": 100} for i in range(5)]
    changed.append({"path": "huge", "size": 10**9})
    notices = asyncio.run(sync.after_cell({"changed": changed}))
    assert sorted(os.listdir(tmp_path / "notebook")) == ["f0", "f1"]
    assert any("MODBOX_SYNC_FILE_LIMIT" in n and "huge" in n for n in notices)
    assert any("MODBOX_SYNC_LIMIT" in n and "f2" in n for n in notices)


def test_a_link_on_the_host_is_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    folder = tmp_path / "notebook"
    folder.mkdir()
    (folder / "linked").symlink_to(outside)
    (folder / "target.txt").symlink_to(outside / "victim.txt")
    host = HostFolder(str(folder), {})
    with pytest.raises(Refused):
        host.open_new("linked/planted.txt")
    incoming = host.open_new("target.txt")
    incoming.write(b"new")
    with pytest.raises(Conflict):  # something other than a file is there
        incoming.commit()
    assert list(outside.iterdir()) == []
    assert (folder / "target.txt").is_symlink()


def test_a_host_file_is_replaced_only_while_it_is_as_copied(tmp_path: Path) -> None:
    folder = tmp_path / "notebook"
    folder.mkdir()
    kept = folder / "data.csv"
    kept.write_text("as copied\n")
    st = kept.stat()
    host = HostFolder(str(folder), {"data.csv": (st.st_size, st.st_mtime_ns)})
    first = host.open_new("data.csv")
    first.write(b"from the sandbox\n")
    first.commit()
    assert kept.read_text() == "from the sandbox\n"  # unchanged since the copy: replaced
    kept.write_text("edited on the host meanwhile\n")
    second = host.open_new("data.csv")
    second.write(b"again from the sandbox\n")
    with pytest.raises(Conflict):
        second.commit()
    assert kept.read_text() == "edited on the host meanwhile\n"
    forced = host.open_new("data.csv")
    forced.write(b"pulled\n")
    forced.commit(replace=True)
    assert kept.read_text() == "pulled\n"
    assert sorted(os.listdir(folder)) == ["data.csv"]  # no temporary files left
