"""A TCP proxy on loopback that delays each direction by a fixed time: a WAN stand-in.

Used by ``bench_wan.py``: the kernel talks to a shared local service through it, and the
service advertises the proxy (``--public-url``) so runtime calls take the same path.
Every chunk read on one side is written to the other ``delay`` seconds later, in
order; bandwidth is not limited (loopback's), so an RTT of ``2 * delay`` is all that
changes. It runs in a process of its own (this file as a script, handed the listening
socket): a network is not in the client's process, and a proxy thread there would
compete for the benchmark's GIL and add its own milliseconds to every figure.
"""

from __future__ import annotations

import asyncio
import contextlib
import selectors
import socket
import subprocess
import sys
import time


class DelayProxy:
    """``listen()`` gives the port; ``start(upstream_port)`` begins forwarding to it."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._upstream = 0
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, upstream_port: int) -> None:
        """Forward to ``upstream_port`` from a child process that takes the socket."""
        self._upstream = upstream_port
        fd = self._sock.fileno()
        self._process = subprocess.Popen(
            [sys.executable, __file__, str(fd), str(upstream_port), repr(self.delay)],
            pass_fds=[fd],
        )
        self._sock.close()  # the child listens now

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(5)

    async def _serve(self) -> None:
        self._server = await asyncio.start_server(self._client, sock=self._sock)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._upstream)
        except OSError:
            writer.close()
            return
        await asyncio.gather(
            self._pump(reader, up_writer), self._pump(up_reader, writer), return_exceptions=True
        )

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                pause = due - time.monotonic()
                if pause > 0:
                    await asyncio.sleep(pause)
                if not data:
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()

        sender = asyncio.ensure_future(deliver())
        try:
            while data := await reader.read(1 << 16):
                queue.put_nowait((time.monotonic() + self.delay, data))
        except OSError:
            pass
        finally:
            queue.put_nowait((time.monotonic() + self.delay, b""))
            with contextlib.suppress(Exception):
                await sender
            writer.close()


async def _main(fd: int, upstream: int, delay: float) -> None:
    proxy = DelayProxy.__new__(DelayProxy)
    proxy.delay, proxy._upstream = delay, upstream
    proxy._sock = socket.socket(fileno=fd)
    await proxy._serve()
    await asyncio.Event().wait()  # until terminated


if __name__ == "__main__":
    # select(2) takes its timeout in microseconds, epoll(7) in milliseconds: on an epoll
    # loop every delayed write would wait up to 1 ms longer than asked, in each
    # direction, and the stand-in network's RTT would be too long by up to 2 ms.
    loop = asyncio.SelectorEventLoop(selectors.SelectSelector())
    loop.run_until_complete(_main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])))
