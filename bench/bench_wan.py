"""Modbox Python across a network: a shared local service behind a delay proxy.

Run: ``.venv/bin/python bench/bench_wan.py [--rtt 0,40,100] [--rounds 40]``.

For each round-trip time, a shared ``modbox_kernel.local`` service is started behind
``delayproxy.DelayProxy`` (each direction delayed by RTT/2; the service's
``--public-url`` sends the sandbox runtime calls through the proxy too), and a
modbox-python kernel is pointed at it with ``MODBOX_API_URL`` / ``MODBOX_API_TOKEN``,
as against api.modbox.run. Printed per RTT, beside the stock python3 kernel measured
in the same run (which has no network in its path):

* cold start → first ``1+1`` result;
* cell ``pass`` round trip p50 (execute_request → idle);
* stream latency p50/p95 (``print`` of a timestamp in the sandbox → the IOPub message);
* interrupt → the KeyboardInterrupt reply (median of 5);
* stdout throughput (50 MB in 1 MB writes, output cap lifted);
* the proxy's own round trip: ``GET /health`` through it, p50 (what a cell's one
  request costs in network alone; the proxy's timers add a little to the nominal RTT).

The figures the issue asks for at RTT 40 ms: stream p50 ≤ 35 ms, ``pass`` p50 ≤ RTT
+ 10 ms, interrupt ≤ 200 ms, throughput ≥ 25 MB/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import httpx
from bench_kernel import interrupt_latency, pct, run_cell, start, stream_latencies, throughput
from delayproxy import DelayProxy


def figures(name: str, env: dict[str, str], rounds: int) -> dict[str, float]:
    colds = []
    for _ in range(2):
        km, kc, seconds = start(name, env)
        colds.append(seconds)
        kc.stop_channels()
        km.shutdown_kernel(now=False)
    km, kc, _ = start(name, env)
    try:
        for _ in range(5):
            run_cell(kc, "pass")
        cells = [run_cell(kc, "pass")[0] * 1000 for _ in range(rounds)]
        latency = [x * 1000 for x in stream_latencies(kc)]
        interrupts = [interrupt_latency(km, kc, settle=0.3) * 1000 for _ in range(5)]
        rate = max(throughput(kc) for _ in range(2))
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)
    return {
        "cold start (s)": min(colds),
        "cell `pass` p50 (ms)": statistics.median(cells),
        "stream latency p50 (ms)": pct(latency, 50),
        "stream latency p95 (ms)": pct(latency, 95),
        "interrupt to reply (ms)": statistics.median(interrupts),
        "stdout throughput (MB/s)": rate,
    }


NETWORK = "proxy round trip p50 (ms)"


def network_round_trip(url: str, rounds: int = 40) -> float:
    """p50 in ms of ``GET /health`` through the proxy: the network's part of a request."""
    times = []
    with httpx.Client() as client:
        client.get(f"{url}/health")
        for _ in range(rounds):
            t0 = time.perf_counter()
            client.get(f"{url}/health")
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def behind_proxy(rtt_ms: float) -> tuple[subprocess.Popen[bytes], DelayProxy, dict[str, str]]:
    """A shared service reachable only through a proxy of this RTT, and a kernel env."""
    proxy = DelayProxy(rtt_ms / 2000.0)
    service = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "modbox_kernel.local",
            "--port",
            "0",
            "--exit-with-parent",
            "--public-url",
            proxy.url,
            "--log-level",
            "WARNING",
        ],
        stdout=subprocess.PIPE,
    )
    assert service.stdout is not None
    line = json.loads(service.stdout.readline())
    proxy.start(int(line["base_url"].rsplit(":", 1)[1]))
    env = dict(os.environ)
    env.update(
        MODBOX_API_URL=proxy.url,
        MODBOX_API_TOKEN=line["token"],
        MODBOX_BACKEND="remote",
        MODBOX_OUTPUT_LIMIT="0",
    )
    return service, proxy, env


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rtt", default="0,40,100", help="round-trip times in ms, e.g. 0,40")
    parser.add_argument("--rounds", type=int, default=40, help="`pass` cells per kernel")
    args = parser.parse_args()
    rtts = [float(x) for x in args.rtt.split(",") if x.strip()]

    local = dict(os.environ, MODBOX_OUTPUT_LIMIT="0")
    columns = {"python3": figures("python3", local, args.rounds)}
    columns["python3"][NETWORK] = 0.0
    for rtt in rtts:
        service, proxy, env = behind_proxy(rtt)
        try:
            column = figures("modbox-python", env, args.rounds)
            column[NETWORK] = network_round_trip(proxy.url)
            columns[f"RTT {rtt:g} ms"] = column
        finally:
            service.terminate()
            service.wait(10)
            proxy.stop()

    names = list(columns)
    print(f"\n{'metric':28}" + "".join(f"{n:>14}" for n in names))
    for metric in columns["python3"]:
        print(f"{metric:28}" + "".join(f"{columns[n][metric]:14.1f}" for n in names))


if __name__ == "__main__":
    main()
