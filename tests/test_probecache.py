"""A passed bubblewrap probe is remembered until the next boot, and only trusted there.

The probe costs every embedded service ~70 ms before its first sandbox; the record
(``modbox_kernel/local/probecache.py``) lets a second service with the same jail skip
it. The service tests run the real service twice against one cache folder and check
that the second still isolates; the unit tests check what the record trusts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from service_helpers import require_bwrap, running_local_service, running_sandbox

from modbox_kernel.local import probecache

pytestmark = pytest.mark.timeout(120)

SKIPPED = b"passed its probe earlier this boot; not probing again"


def test_a_second_service_skips_the_probe_and_still_isolates(tmp_path: Path) -> None:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    with running_local_service(first_log, env=env) as first:
        require_bwrap(first, "the probe is bubblewrap's")
    assert SKIPPED not in first_log.read_bytes()
    assert (tmp_path / "cache" / "modbox-kernel" / "bwrap-probes").is_file()
    with running_local_service(second_log, env=env) as second:
        assert second.isolation == "bwrap"
        with running_sandbox(second) as sandbox:
            pid1 = sandbox.exec("cat /proc/1/comm")
            assert pid1["exitCode"] == 0 and pid1["stdout"].strip() == "bwrap", pid1
    assert SKIPPED in second_log.read_bytes()


def test_check_always_probes(tmp_path: Path) -> None:
    # --check is how an operator asks what this host gives: never from a record.
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-m", "modbox_kernel.local", "--check"],
            env=env, capture_output=True, timeout=90,
        )  # fmt: skip
        assert SKIPPED not in done.stderr + done.stdout


def test_the_record_is_trusted_only_when_it_is_ours_alone(tmp_path: Path) -> None:
    record = tmp_path / "probes" / "bwrap-probes"
    assert not probecache.passed_before("k1", record)
    probecache.remember("k1", record)
    assert probecache.passed_before("k1", record)
    assert not probecache.passed_before("k2", record)
    assert not probecache.passed_before(None, record)
    record.chmod(0o620)  # group-writable: someone else could have written it
    assert not probecache.passed_before("k1", record)
    record.chmod(0o600)
    record.parent.chmod(0o777)
    assert not probecache.passed_before("k1", record)
    record.parent.chmod(0o700)
    assert probecache.passed_before("k1", record)
    link = tmp_path / "probes" / "link"
    link.symlink_to(record)
    assert not probecache.passed_before("k1", link)


def test_only_a_few_keys_are_kept(tmp_path: Path) -> None:
    record = tmp_path / "bwrap-probes"
    for i in range(probecache.KEEP_KEYS + 5):
        probecache.remember(f"key{i}", record)
    assert not probecache.passed_before("key0", record)
    assert probecache.passed_before(f"key{probecache.KEEP_KEYS + 4}", record)
    assert len(record.read_text().split()) == probecache.KEEP_KEYS
