"""A full host: the first cell waits in line, says so, and runs when a place frees.

Against a real local service capped at two live sandboxes (``--max-sandboxes 2``) and
real kernels: two students hold the two sandboxes; a third student's first cell shows
that it is waiting, with its place in line, then runs within seconds of one of the
first two shutting down. With a short ``MODBOX_STARTUP_TIMEOUT`` the wait ends instead
in one sentence naming the capacity and the setting, and the kernel lives on.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kernel_helpers import (
    KERNEL_NAME,
    pump,
    run_cell,
    service_env,
    start_kernel,
    stop_kernel,
    submit,
)
from service_helpers import LocalService, running_local_service

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def two_seat_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalService]:
    log = Path(tmp_path_factory.mktemp("two-seats")) / "service.log"
    with running_local_service(log, "--max-sandboxes", "2") as service:
        yield service


def _progress_texts(run: object) -> list[str]:
    return [
        m["content"]["data"]["text/plain"]
        for m in run.outputs  # type: ignore[attr-defined]
        if m["msg_type"] in ("display_data", "update_display_data")
        and "modbox-progress" in m["content"].get("transient", {}).get("display_id", "")
    ]


def _take_both_seats(env: dict[str, str], started: list[tuple[Any, Any]]) -> None:
    """Two students whose kernels hold the service's two sandboxes."""
    for _ in range(2):
        km, kc = start_kernel(KERNEL_NAME, env)
        started.append((km, kc))
        assert run_cell(kc, "1").status == "ok"


def test_the_third_student_waits_in_line_then_runs(two_seat_service: LocalService) -> None:
    env = service_env(two_seat_service.base_url, two_seat_service.token)
    started: list[tuple[Any, Any]] = []
    try:
        _take_both_seats(env, started)
        km, kc = start_kernel(KERNEL_NAME, env)
        started.append((km, kc))
        run = submit(kc, "print('my turn')")
        # The first cell says it waits, and where it stands.
        assert pump(kc, run, lambda: any("in line" in t for t in _progress_texts(run)), 30), (
            run.describe()
        )
        waiting = [t for t in _progress_texts(run) if "in line" in t][-1]
        assert waiting.startswith("Waiting for a Modbox sandbox… ")
        assert "the host is at capacity: 2 sandboxes running" in waiting.lower()
        assert "you are number 1 of 1 in line" in waiting
        assert not run.reply, "the cell must wait, not fail"
        # A place frees: the waiting cell runs within seconds.
        freed_at = time.monotonic()
        stop_kernel(*started.pop(0))
        assert pump(kc, run, lambda: run.done, 60), run.describe()
        assert run.status == "ok" and run.stdout == "my turn\n", run.describe()
        assert run.reply_at - freed_at < 5.0, f"ran {run.reply_at - freed_at:.1f} s after"
        # The progress line was removed; nothing of the wait stays in the saved output.
        assert run.outputs[-1]["msg_type"] == "stream", [m["msg_type"] for m in run.outputs]
        assert any(m["msg_type"] == "clear_output" for m in run.outputs)
    finally:
        for km, kc in started:
            stop_kernel(km, kc)


def test_a_wait_past_the_startup_timeout_is_one_sentence(two_seat_service: LocalService) -> None:
    env = service_env(two_seat_service.base_url, two_seat_service.token)
    started: list[tuple[Any, Any]] = []
    try:
        _take_both_seats(env, started)
        km, kc = start_kernel(KERNEL_NAME, {**env, "MODBOX_STARTUP_TIMEOUT": "3"})
        started.append((km, kc))
        first = run_cell(kc, "print('never')", timeout=30)
        assert first.status == "error", first.describe()
        content = first.reply["content"]
        assert content["ename"] == "SandboxUnavailable"
        sentence = content["evalue"]
        assert "no Modbox sandbox became free within 3 s" in sentence, sentence
        assert (
            "the host is at capacity" in sentence.lower() and "MODBOX_STARTUP_TIMEOUT" in sentence
        )
        # Alive: it answers, and once a place is free its next cell runs.
        stop_kernel(*started.pop(0))
        again = run_cell(kc, "print('now')", timeout=60)
        assert again.status == "ok" and again.stdout == "now\n", again.describe()
    finally:
        for km, kc in started:
            stop_kernel(km, kc)


def test_an_interrupted_wait_keeps_its_place_in_line(two_seat_service: LocalService) -> None:
    # A student who presses stop while the first cell waits gets the prompt back at
    # once, and loses neither the sandbox being started nor the place in line.
    env = service_env(two_seat_service.base_url, two_seat_service.token)
    started: list[tuple[Any, Any]] = []
    try:
        _take_both_seats(env, started)
        km, kc = start_kernel(KERNEL_NAME, env)
        started.append((km, kc))
        run = submit(kc, "x = 'first'")
        assert pump(kc, run, lambda: any("in line" in t for t in _progress_texts(run)), 30), (
            run.describe()
        )
        km.interrupt_kernel()
        assert pump(kc, run, lambda: run.done, 10), run.describe()
        content = run.reply["content"]
        assert run.status == "error" and content["ename"] == "KeyboardInterrupt", run.describe()
        assert "keeping its place in line" in content["evalue"], content["evalue"]
        assert any(m["msg_type"] == "clear_output" for m in run.outputs), run.describe()
        # A later student queues behind the interrupted one.
        later_km, later_kc = start_kernel(KERNEL_NAME, env)
        started.append((later_km, later_kc))
        later = submit(later_kc, "print('later')")
        assert pump(
            later_kc, later, lambda: any("number 2 of 2" in t for t in _progress_texts(later)), 30
        ), later.describe()
        # One place frees: it goes to the interrupted student, whose next cell runs.
        stop_kernel(*started.pop(0))
        again = run_cell(kc, "print('mine')", timeout=60)
        assert again.status == "ok" and again.stdout == "mine\n", again.describe()
        assert again.stderr == "", "the sandbox kept starting: no lost-state notice"
        assert not pump(later_kc, later, lambda: bool(later.reply), 1.0), later.describe()
        stop_kernel(*started.pop(0))
        assert pump(later_kc, later, lambda: later.done, 60), later.describe()
        assert later.status == "ok" and later.stdout == "later\n", later.describe()
    finally:
        for km, kc in started:
            stop_kernel(km, kc)
