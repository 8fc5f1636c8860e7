"""A TCP relay in front of a real Redis that delays chosen replies, for tests of what a client
does when a command was applied but its answer came too late."""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit


class SlowReplyProxy:
    """A TCP relay to Redis that can hold back Redis's replies to commands containing a marker:
    the command is applied, but its answer arrives after the client's socket timeout (a slow
    network, a busy Redis)."""

    def __init__(self, redis_url: str) -> None:
        parts = urlsplit(redis_url)
        self._target = (parts.hostname or "127.0.0.1", parts.port or 6379)
        self._path = parts.path
        self._marker = b""
        self._hold_s = 0.0
        self._times = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def hold(self, marker: bytes, seconds: float, times: int = 1) -> None:
        """Delay the replies to the next `times` commands whose bytes contain `marker`."""
        self._marker, self._hold_s, self._times = marker, seconds, times

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}{self._path}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(*self._target)
        held = [0.0]  # this connection's next reply waits this long

        async def requests() -> None:
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                while data := await client_r.read(65536):
                    if self._times and self._marker in data:
                        self._times -= 1
                        held[0] = self._hold_s
                    server_w.write(data)
                    await server_w.drain()
            server_w.close()

        async def replies() -> None:
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                while data := await server_r.read(65536):
                    if held[0]:
                        delay, held[0] = held[0], 0.0
                        await asyncio.sleep(delay)
                    client_w.write(data)
                    await client_w.drain()
            client_w.close()

        for task in (asyncio.create_task(requests()), asyncio.create_task(replies())):
            self._tasks.add(task)
