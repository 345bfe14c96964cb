"""The agent's look at its working folder (``agent/inside/workfiles.py``), in-process.

The kernel tests run it inside sandboxes; these pin down what a look reports and that
a cell which wrote nothing costs no walk where inotify is available (with a fallback
walk where it is not).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from modbox_kernel.agent.inside import workfiles


@pytest.fixture(params=["inotify", "walk"])
def tracker(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: Any) -> Any:
    if request.param == "walk":
        monkeypatch.setattr(workfiles.Watcher, "__init__", _unusable)
    (tmp_path / "data.csv").write_text("x\n")
    tracker = workfiles.Tracker()
    assert tracker.set_root(str(tmp_path), per_cell=True) == 1
    if request.param == "inotify":
        assert tracker._watcher is not None and tracker._watcher.usable
    return tracker


def _unusable(self: workfiles.Watcher) -> None:
    self.usable = False
    self._fd = -1


def test_a_look_reports_new_and_changed_files_once(tracker: Any, tmp_path: Path) -> None:
    assert tracker.after_cell() is None
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "out.txt").write_text("new")
    (tmp_path / ".hidden").write_text("never")
    assert tracker.after_cell() == {"changed": [{"path": "sub/out.txt", "size": 3}], "skipped": []}
    assert tracker.after_cell() is None
    # Same size, new content: the mtime tells.
    os.utime(tmp_path / "data.csv", ns=(1, 1))
    assert tracker.after_cell() == {"changed": [{"path": "data.csv", "size": 2}], "skipped": []}
    # A file written in a folder made after the first look is seen too.
    (tmp_path / "sub" / "deeper").mkdir()
    assert tracker.after_cell() is None  # an empty folder is no file
    (tmp_path / "sub" / "deeper" / "x.bin").write_bytes(b"1234")
    assert tracker.after_cell() == {
        "changed": [{"path": "sub/deeper/x.bin", "size": 4}],
        "skipped": [],
    }
    os.symlink("/etc/passwd", tmp_path / "link")
    assert tracker.after_cell() == {"changed": [], "skipped": [{"path": "link", "why": "link"}]}


def test_no_event_means_no_walk(tmp_path: Path, monkeypatch: Any) -> None:
    tracker = workfiles.Tracker()
    tracker.set_root(str(tmp_path), per_cell=True)
    assert tracker._watcher is not None and tracker._watcher.usable
    walks = []
    real = workfiles.scan
    monkeypatch.setattr(workfiles, "scan", lambda *a, **k: walks.append(1) or real(*a, **k))
    for _ in range(5):
        assert tracker.after_cell() is None
    assert walks == []
    (tmp_path / "a.txt").write_text("a")
    assert tracker.after_cell() is not None and walks == [1]


def test_a_pushed_file_is_not_a_cells_change(tracker: Any, tmp_path: Path) -> None:
    answer = workfiles.write_file(
        {"path": str(tmp_path / "pushed.txt"), "offset": 0, "data": "aGk="}, tracker
    )
    assert answer == {"ok": True, "size": 2}
    assert tracker.after_cell() is None
