"""Output floods (issue 4): bounded time, bounded kernel memory, a bounded IOPub rate,
one truncation notice, and a kernel that stays responsive and interruptible.

jupyter_server drops IOPub output above 1000 msg/s (and ZMQ drops silently behind a
slow subscriber), so a sandbox that prints in a tight loop must reach the frontend as
a few coalesced stream messages per second; and a 50 MB string must neither take the
kernel's memory with it nor reach the notebook whole: the per-cell output cap
(``ModboxKernel.output_limit`` / ``MODBOX_OUTPUT_LIMIT``, default 10 MiB) cuts it with
one notice.

The kernel's memory is read with psutil on the kernel process (the pid jupyter_client
started), sampled every 20 ms while the cell runs; the message rate is counted per
one-second window of arrival time at this client. Figures are printed (``pytest -s``).
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import psutil
import pytest
from kernel_helpers import (
    CellRun,
    Kernel,
    Kernels,
    env_for_kernel,
    only_modbox,
    pump,
    run_cell,
    start_cell,
)

pytestmark = [
    pytest.mark.kernel,
    only_modbox("the output cap and coalescing under test are modbox kernel features"),
]

MIB = 1024 * 1024
DEFAULT_LIMIT = 10 * MIB
SMALL_LIMIT = 100_000
RSS_GROWTH_LIMIT = 200 * MIB
# jupyter_server's iopub_msg_rate_limit; the kernel must stay well under it.
MSG_RATE_LIMIT = 1000
NOTICE = "[Modbox: output of this cell truncated after"


@pytest.fixture(scope="module")
def kernel(request: pytest.FixtureRequest, kernels: Kernels) -> Kernel:
    return kernels.start(env_for_kernel(request))


@pytest.fixture(scope="module")
def small_cap_kernel(request: pytest.FixtureRequest, kernels: Kernels) -> Kernel:
    return kernels.start({**env_for_kernel(request), "MODBOX_OUTPUT_LIMIT": str(SMALL_LIMIT)})


class PeakRss:
    """Samples a process's RSS in a thread; ``peak`` is the largest value seen."""

    def __init__(self, process: psutil.Process, interval: float = 0.02) -> None:
        self.process = process
        self.interval = interval
        self.start = process.memory_info().rss
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def stream_messages(run: CellRun) -> list[float]:
    return [
        t for m, t in zip(run.outputs, run.output_times, strict=True) if m["msg_type"] == "stream"
    ]


def max_rate(times: list[float]) -> int:
    """The most stream messages that arrived within one one-second window (bucketed)."""
    if not times:
        return 0
    buckets = Counter(int((t - times[0]) // 1.0) for t in times)
    return max(buckets.values())


@pytest.mark.timeout(300)
def test_a_50_mb_print_is_capped_in_bounded_time_and_memory(kernel: Kernel) -> None:
    with PeakRss(kernel.process) as rss:
        run = run_cell(kernel.kc, "print('x' * 50_000_000)", timeout=120)

    took = run.reply_at - run.sent_at
    growth = rss.peak - rss.start
    print(
        f"\n50 MB print: {took:.2f} s, kernel RSS {rss.start / MIB:.0f} -> peak "
        f"{rss.peak / MIB:.0f} MiB (+{growth / MIB:.0f} MiB), {len(run.outputs)} outputs, "
        f"{len(run.stdout) / MIB:.2f} MiB of stdout delivered"
    )
    assert run.status == "ok", run.describe()
    assert growth < RSS_GROWTH_LIMIT, f"kernel RSS grew by {growth / MIB:.0f} MiB"
    assert took < 60, f"the cell took {took:.1f} s"
    text = run.stdout + run.stderr
    assert text.count(NOTICE) == 1, f"{text.count(NOTICE)} truncation notices"
    assert DEFAULT_LIMIT <= len(text) < DEFAULT_LIMIT + 4096, len(text)
    assert run.stdout.startswith("x" * 1000)
    after = run_cell(kernel.kc, "print('small')")
    assert (after.stdout, after.stderr) == ("small\n", ""), "the cap leaked into the next cell"


@pytest.mark.timeout(300)
def test_an_endless_print_loop_is_interruptible_and_rate_limited(kernel: Kernel) -> None:
    assert run_cell(kernel.kc, "survivor = 'yes'").status == "ok"
    code = "while True:\n    print('x' * 100)"
    run = start_cell(kernel.kc, code, "x" * 100)
    pump(kernel.kc, run, lambda: False, 3.0)  # let it flood for ~3 s

    sent = time.monotonic()
    kernel.km.interrupt_kernel()
    ended = pump(kernel.kc, run, lambda: run.done, 30)

    assert ended, f"the flood was not interrupted:\n{run.describe()[:2000]}"
    latency = run.reply_at - sent
    times = stream_messages(run)
    rate = max_rate(times)
    print(
        f"\nprint flood: interrupted after {latency:.2f} s; {len(times)} stream messages, "
        f"at most {rate} in one second; {len(run.stdout) / MIB:.2f} MiB delivered"
    )
    assert run.reply["content"]["ename"] == "KeyboardInterrupt", run.describe()[:2000]
    assert latency < 5.0
    assert rate < MSG_RATE_LIMIT, f"{rate} stream messages in one second"
    # Responsive at once, and the namespace survived.
    after = run_cell(kernel.kc, "print(survivor)", timeout=10)
    assert after.stdout == "yes\n", after.describe()
    assert after.reply_at - after.sent_at < 5.0


@pytest.mark.timeout(300)
def test_many_tiny_flushed_prints_arrive_in_few_messages(kernel: Kernel) -> None:
    count = 200_000
    run = run_cell(kernel.kc, f"for i in range({count}):\n    print(i, flush=True)", timeout=240)

    took = run.reply_at - run.sent_at
    times = stream_messages(run)
    print(
        f"\n{count} flushed prints: {took:.2f} s, {len(times)} stream messages, "
        f"at most {max_rate(times)} in one second"
    )
    assert run.status == "ok", run.describe()[:2000]
    assert run.stdout == "".join(f"{i}\n" for i in range(count)), "output lost or reordered"
    assert took < 120, f"the cell took {took:.1f} s"
    assert len(times) < 1000, f"{len(times)} stream messages for {count} prints"
    assert max_rate(times) < MSG_RATE_LIMIT


@pytest.mark.timeout(300)
def test_the_truncation_notice_appears_once_per_cell(small_cap_kernel: Kernel) -> None:
    kc = small_cap_kernel.kc
    # Many writes on both streams, well past the limit, with pauses so that the output
    # arrives over several polls rather than in one piece.
    code = (
        "import sys\n"
        "for i in range(400):\n"
        "    print(f'{i:05d}' + 'o' * 995)\n"
        "    sys.stderr.write(f'{i:05d}' + 'e' * 995 + '\\n')\n"
        "    if i % 50 == 0:\n"
        "        time.sleep(0.1)\n"
        "print('last line')\n"
    )
    for attempt in range(2):  # and again: the cap is per cell, not per kernel
        run = run_cell(kc, code, timeout=120)
        assert run.status == "ok", run.describe()[:2000]
        text = run.stdout + run.stderr
        print(f"\ncapped cell {attempt}: {len(text)} characters, {len(run.outputs)} outputs")
        assert text.count(NOTICE) == 1, f"{text.count(NOTICE)} notices in cell {attempt}"
        assert f"after {SMALL_LIMIT} bytes" in text
        assert "last line" not in text
        assert SMALL_LIMIT <= len(text) < SMALL_LIMIT + 1024
        assert run.stdout.startswith("00000" + "o" * 995 + "\n")

    after = run_cell(kc, "print('fine')")
    assert (after.stdout, after.stderr) == ("fine\n", ""), after.describe()
