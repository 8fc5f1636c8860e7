"""One pipelined Redis connection that every placement in the process shares.

redis-py spends about 150 µs of CPU per command on pool checkout, retry and timeout
wrappers, and writes each command with its own system call; at a thousand placements
a second and three commands each, that was most of a core. Here the commands that
coroutines issue during one event-loop iteration go out in a single write, and the
replies are matched to their callers in order (Redis answers a connection's commands
in the order it received them). A lone command costs one write and one read; under
load the cost per command shrinks as more of them share a write.

Semantics are those of separate commands: nothing here is a transaction, so what must
be atomic stays in one Lua script. Errors are redis-py's exception classes, so callers
handle both clients alike. A command whose reply takes longer than `reply_timeout_s`
fails the connection (its replies could no longer be matched) and every command in
flight with it; the next command reconnects. Single-node Redis only (a plain address
or a Unix socket, as the rest of kvgate uses), not Redis Cluster.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import hiredis
from redis import exceptions as rx
from redis.asyncio import Redis
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection

Arg = str | bytes | int | float

DEFAULT_CONNECT_TIMEOUT_S = 1.0
DEFAULT_REPLY_TIMEOUT_S = 2.0
CLIENT_NAME = "kvgate-placement"


@dataclass(frozen=True)
class ScriptRef:
    """A Lua script called by its SHA1, loaded on demand (after a Redis restart, say)."""

    source: str
    sha: str

    @classmethod
    def of(cls, source: str) -> ScriptRef:
        return cls(source, hashlib.sha1(source.encode()).hexdigest())


class _Pending:
    __slots__ = ("deadline", "future", "remaining", "replies", "single")

    def __init__(self, future: asyncio.Future[Any], count: int, single: bool, deadline: float) -> None:
        self.future = future
        self.remaining = count
        self.single = single
        self.deadline = deadline
        self.replies: list[Any] = []


class _Protocol(asyncio.Protocol):
    def __init__(self, mux: RedisMux) -> None:
        self._mux = mux
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader(replyError=rx.ResponseError)
        self.pending: collections.deque[_Pending] = collections.deque()
        self.out: list[bytes] = []
        self.flush_scheduled = False
        self.closed = False
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, hence a cast, not a check.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        pending = self.pending
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                self.fail(rx.ConnectionError(f"Redis protocol error: {exc}"))
                return
            if reply is False:
                return
            if not pending:
                self.fail(rx.ConnectionError("Redis sent a reply nobody asked for"))
                return
            head = pending[0]
            head.replies.append(reply)
            head.remaining -= 1
            if head.remaining:
                continue
            pending.popleft()
            future = head.future
            if future.done():
                continue  # its caller was cancelled; the reply still had to be consumed
            if head.single:
                if isinstance(reply, rx.ResponseError):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)
            else:
                future.set_result(head.replies)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(rx.ConnectionError(f"Redis connection lost: {exc or 'closed by server'}"))

    def fail(self, error: rx.RedisError) -> None:
        """Fail every command in flight and drop the connection (its reply stream is unusable)."""
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        while self.pending:
            future = self.pending.popleft().future
            if not future.done():
                future.set_exception(error)
        if self.transport is not None:
            self.transport.abort()
        self._mux._forget(self)

    def enqueue(self, packed: bytes, count: int, single: bool, timeout_s: float) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if self.closed:
            # Lost between the caller getting this connection and sending on it.
            future.set_exception(rx.ConnectionError("Redis connection lost"))
            return future
        self.pending.append(_Pending(future, count, single, time.monotonic() + timeout_s))
        self.out.append(packed)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            loop.call_soon(self.flush)
        if self.timer is None:
            self.timer = loop.call_later(timeout_s, self.check_deadline)
        return future

    def flush(self) -> None:
        self.flush_scheduled = False
        if self.closed or self.transport is None or not self.out:
            return
        data = b"".join(self.out)
        self.out.clear()
        self.transport.write(data)

    def check_deadline(self) -> None:
        self.timer = None
        if not self.pending or self.closed:
            return
        left = self.pending[0].deadline - time.monotonic()
        if left <= 0:
            self.fail(rx.TimeoutError("Timeout reading from Redis"))
            return
        self.timer = asyncio.get_running_loop().call_later(left, self.check_deadline)


class RedisMux:
    def __init__(
        self,
        host: str = "localhost",
        port: int = 6379,
        *,
        path: str = "",
        username: str | None = None,
        password: str | None = None,
        db: int = 0,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        reply_timeout_s: float = DEFAULT_REPLY_TIMEOUT_S,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._ssl_context = ssl_context
        self._host = host
        self._port = port
        self._path = path
        self._username = username
        self._password = password
        self._db = db
        self._connect_timeout_s = connect_timeout_s
        self.reply_timeout_s = reply_timeout_s
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Task[_Protocol] | None = None

    @classmethod
    def like(cls, client: Redis) -> RedisMux:
        """A connection to the server (and database, with the credentials) `client` uses."""
        pool = client.connection_pool
        kwargs = pool.connection_kwargs
        connect_timeout_s = float(kwargs.get("socket_connect_timeout") or DEFAULT_CONNECT_TIMEOUT_S)
        reply_timeout_s = float(kwargs.get("socket_timeout") or DEFAULT_REPLY_TIMEOUT_S)
        username, password = kwargs.get("username"), kwargs.get("password")
        db = int(kwargs.get("db") or 0)
        ssl_context = None
        if pool.connection_class is UnixDomainSocketConnection:
            host, port, path = "", 0, str(kwargs["path"])
        elif pool.connection_class in (Connection, SSLConnection):
            host, port, path = str(kwargs.get("host", "localhost")), int(kwargs.get("port", 6379)), ""
            if pool.connection_class is SSLConnection:
                # rediss://: the same TLS settings (ssl_ca_certs, ssl_cert_reqs, ...) redis-py uses.
                ssl_context = SSLConnection(**kwargs).ssl_context.get()
        else:
            raise ValueError(
                f"the scheduler's placement connection supports redis://, rediss:// and unix:// URLs, "
                f"not {pool.connection_class.__name__}"
            )
        return cls(
            host, port, path=path, username=username, password=password, db=db,
            connect_timeout_s=connect_timeout_s, reply_timeout_s=reply_timeout_s, ssl_context=ssl_context,
        )  # fmt: skip

    async def execute(self, *args: Arg, retry: bool = False) -> Any:
        """One command's reply. `retry`: send it once more if the connection broke meanwhile
        (only for commands that are safe to run twice)."""
        packed = _pack(args)
        try:
            return await (await self._connection()).enqueue(packed, 1, True, self.reply_timeout_s)
        except rx.ConnectionError:
            if not retry:
                raise
        return await (await self._connection()).enqueue(packed, 1, True, self.reply_timeout_s)

    async def execute_many(self, commands: Sequence[Sequence[Arg]], *, retry: bool = False) -> list[Any]:
        """Replies to several commands sent back to back (not atomically); error replies are
        returned in place, as ResponseError instances, for the caller to inspect."""
        packed = b"".join(_pack(c) for c in commands)
        try:
            return await self.send_many_packed(packed, len(commands))
        except rx.ConnectionError:
            if not retry:
                raise
        return await self.send_many_packed(packed, len(commands))

    async def send_many_packed(self, packed: bytes, count: int) -> list[Any]:
        result: list[Any] = await (await self._connection()).enqueue(
            packed, count, False, self.reply_timeout_s
        )
        return result

    async def evalsha(
        self, script: ScriptRef, keys: Sequence[Arg], args: Sequence[Arg], *, retry: bool = False
    ) -> Any:
        try:
            return await self.execute("EVALSHA", script.sha, len(keys), *keys, *args, retry=retry)
        except rx.ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        await self.execute("SCRIPT", "LOAD", script.source, retry=True)
        return await self.execute("EVALSHA", script.sha, len(keys), *keys, *args, retry=retry)

    async def _connection(self) -> _Protocol:
        protocol = self._protocol
        if protocol is not None and not protocol.closed:
            return protocol
        # Callers arriving while a connection is being made share that attempt.
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
        connecting = self._connecting
        try:
            return await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        where = self._path or f"{self._host}:{self._port}"
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                if self._path:
                    _, protocol = await loop.create_unix_connection(lambda: _Protocol(self), self._path)
                else:
                    _, protocol = await loop.create_connection(
                        lambda: _Protocol(self),
                        self._host,
                        self._port,
                        ssl=self._ssl_context,
                        server_hostname=self._host if self._ssl_context is not None else None,
                    )
        except (OSError, TimeoutError) as exc:
            raise rx.ConnectionError(f"Error connecting to Redis at {where}: {exc}") from exc
        # AUTH first: until it succeeds, a server with a password refuses everything else.
        setup: list[tuple[Arg, ...]] = []
        if self._password:
            setup.append(
                ("AUTH", self._username, self._password) if self._username else ("AUTH", self._password)
            )
        if self._db:
            setup.append(("SELECT", self._db))
        # Named, so that CLIENT LIST tells it apart from the redis-py pool's connections.
        setup.append(("CLIENT", "SETNAME", CLIENT_NAME))
        packed = b"".join(_pack(c) for c in setup)
        replies = await protocol.enqueue(packed, len(setup), False, self.reply_timeout_s)
        for command, reply in zip(setup, replies, strict=True):
            if isinstance(reply, rx.ResponseError):
                protocol.fail(rx.ConnectionError(f"Redis at {where} refused {command[0]!r}"))
                if command[0] == "AUTH":
                    raise rx.AuthenticationError(str(reply))
                raise reply
        self._protocol = protocol
        return protocol

    def _forget(self, protocol: _Protocol) -> None:
        if self._protocol is protocol:
            self._protocol = None

    async def aclose(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None
        protocol = self._protocol
        if protocol is not None:
            protocol.fail(rx.ConnectionError("Redis connection closed by kvgate"))


def _pack(command: Sequence[Arg]) -> bytes:
    # hiredis's stub types its argument as a 1-tuple; any tuple of arguments is what it takes.
    packed: bytes = hiredis.pack_command(tuple(command))  # type: ignore[arg-type]
    return packed
