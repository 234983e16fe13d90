"""A TCP proxy on loopback that makes a local S3 server look far away.

Every response's first byte is held ``delay_s`` (a real store's time to first byte) before it
goes to the client; the rest of the response streams unhindered. It relays bytes and knows no
HTTP beyond this: after the client has sent something, the next bytes from the server start a
response. ``bytes_down`` counts what the server sent through it (what a reader fetched), and
``requests`` the responses (one per request on a keep-alive connection). It runs its asyncio
loop in a thread of the calling process (tests, the benchmark).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time


class LatencyProxy:
    """``with LatencyProxy("http://127.0.0.1:8333", 0.04) as proxy: proxy.endpoint``."""

    def __init__(self, upstream: str, delay_s: float) -> None:
        host_port = upstream.split("://", 1)[-1].rstrip("/")
        host, _, port = host_port.partition(":")
        self.upstream = (host, int(port or 80))
        self.delay_s = delay_s
        self.bytes_down = 0
        self.requests = 0
        self.request_lines: list[str] = []
        """The first line of each request (``GET /bucket/key HTTP/1.1``), in order."""
        self.endpoint = ""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="latency-proxy", daemon=True)
        self._server: asyncio.AbstractServer | None = None

    def __enter__(self) -> LatencyProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the latency proxy did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        current = asyncio.current_task()
        tasks = [task for task in asyncio.all_tasks() if task is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def reset_counts(self) -> None:
        self.bytes_down = self.requests = 0
        self.request_lines = []

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", 0))
        port = self._server.sockets[0].getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{port}"
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    async def _client(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_writer.close()
            return
        # When the client last sent bytes, until the server's answer to them begins: the first
        # bytes of that answer go out delay_s after the request came.
        asked: list[float] = []
        up = asyncio.ensure_future(self._upstream(client_reader, server_writer, asked))
        down = asyncio.ensure_future(self._downstream(server_reader, client_writer, asked))
        try:
            await asyncio.wait([up, down], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (up, down):
                task.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
        for writer in (client_writer, server_writer):
            with contextlib.suppress(Exception):
                writer.close()

    async def _upstream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, asked: list[float]
    ) -> None:
        while data := await reader.read(1 << 16):
            if not asked:
                asked.append(time.monotonic())
                self.request_lines.append(data.split(b"\r\n", 1)[0].decode("latin-1"))
            writer.write(data)
            await writer.drain()

    async def _downstream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, asked: list[float]
    ) -> None:
        while data := await reader.read(1 << 18):
            if asked:  # the first bytes of an answer: the store's time to first byte
                asked_at = asked.pop()
                self.requests += 1
                await asyncio.sleep(max(0.0, asked_at + self.delay_s - time.monotonic()))
            self.bytes_down += len(data)
            writer.write(data)
            await writer.drain()
