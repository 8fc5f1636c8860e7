"""The scheduler's pipelined placement connection against a real Redis: replies reach the right
callers under concurrency, errors stay with their command, and a broken or stalled connection
fails what was in flight and is replaced by the next command."""

from __future__ import annotations

import asyncio
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as redis
from redis import exceptions as rx

from kvgate.containers import RedisServer
from scheduler.redis_mux import CLIENT_NAME, RedisMux, ScriptRef

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
async def client(clean_redis: str) -> AsyncIterator[redis.Redis]:
    c = redis.Redis.from_url(clean_redis)
    yield c
    await c.aclose()


@pytest.fixture
async def mux(client: redis.Redis) -> AsyncIterator[RedisMux]:
    m = RedisMux.like(client)
    yield m
    await m.aclose()


async def _kill_mux_connections(client: redis.Redis) -> int:
    killed = 0
    for entry in await client.client_list():
        if entry.get("name") == CLIENT_NAME:
            killed += await client.client_kill_filter(_id=entry["id"])
    return killed


async def test_concurrent_callers_each_get_their_own_reply(mux: RedisMux, client: redis.Redis) -> None:
    await client.mset({f"k{i}": f"v{i}" for i in range(500)})

    async def read(i: int) -> bytes:
        if i % 3 == 0:
            replies = await mux.execute_many([("GET", f"k{i}"), ("STRLEN", f"k{i}")])
            assert replies[1] == len(f"v{i}")
            value: bytes = replies[0]
            return value
        reply: bytes = await mux.execute("GET", f"k{i}")
        return reply

    got = await asyncio.gather(*(read(i) for i in range(500)))
    assert got == [f"v{i}".encode() for i in range(500)]


async def test_an_error_reply_fails_only_its_own_command(mux: RedisMux, client: redis.Redis) -> None:
    await client.set("text", "x")
    results = await asyncio.gather(
        mux.execute("SET", "a", "1"),
        mux.execute("INCR", "text"),  # not an integer
        mux.execute("GET", "a"),
        return_exceptions=True,
    )
    assert results[0] == b"OK"
    assert isinstance(results[1], rx.ResponseError)
    assert results[2] == b"1"
    # In a batch, errors come back in place for the caller to inspect.
    replies = await mux.execute_many([("INCR", "text"), ("INCR", "n")])
    assert isinstance(replies[0], rx.ResponseError) and replies[1] == 1


async def test_a_cancelled_caller_does_not_shift_later_replies(mux: RedisMux, client: redis.Redis) -> None:
    await client.set("a", "A")
    blocked = asyncio.create_task(mux.execute("BLPOP", "nothing", "0.3"))
    await asyncio.sleep(0.05)
    blocked.cancel()
    # Queued behind the BLPOP on the same connection: must get its own reply, not the BLPOP's.
    assert await mux.execute("GET", "a") == b"A"


async def test_scripts_are_loaded_again_after_a_script_flush(mux: RedisMux, client: redis.Redis) -> None:
    script = ScriptRef.of("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    assert await mux.evalsha(script, ["counter"], [2]) == 2
    await client.script_flush()
    assert await mux.evalsha(script, ["counter"], [3]) == 5


async def test_a_killed_connection_fails_in_flight_commands_and_the_next_one_reconnects(
    mux: RedisMux, client: redis.Redis
) -> None:
    await client.set("a", "A")
    assert await mux.execute("GET", "a") == b"A"
    blocked = asyncio.create_task(mux.execute("BLPOP", "nothing", "5"))
    await asyncio.sleep(0.1)
    assert await _kill_mux_connections(client) == 1
    with pytest.raises(rx.ConnectionError):
        await blocked
    assert await mux.execute("GET", "a") == b"A"


async def test_retry_resends_a_command_whose_connection_broke(mux: RedisMux, client: redis.Redis) -> None:
    assert await mux.execute("PING") == b"PONG"
    blocked = asyncio.create_task(mux.execute("BLPOP", "list", "5", retry=True))
    await asyncio.sleep(0.1)
    await _kill_mux_connections(client)
    # The resent BLPOP waits on a new connection and gets this push.
    await asyncio.sleep(0.1)
    await client.rpush("list", "x")
    assert await blocked == [b"list", b"x"]


async def test_a_stalled_reply_times_out_and_the_connection_is_replaced(client: redis.Redis) -> None:
    mux = RedisMux.like(client)
    mux.reply_timeout_s = 0.3
    try:
        await client.set("a", "A")
        with pytest.raises(rx.TimeoutError):
            await mux.execute("BLPOP", "nothing", "3")
        assert await mux.execute("GET", "a") == b"A"
    finally:
        await mux.aclose()


async def test_database_and_credentials_come_from_the_redis_py_client(clean_redis: str) -> None:
    admin = redis.Redis.from_url(clean_redis)
    await admin.acl_setuser("mux-test", enabled=True, passwords=["+s3cret"], keys=["*"], commands=["+@all"])
    base = clean_redis.rsplit("/", 1)[0].replace("redis://", "redis://mux-test:s3cret@")
    user_client = redis.Redis.from_url(f"{base}/3")
    mux = RedisMux.like(user_client)
    wrong = RedisMux.like(redis.Redis.from_url(base.replace("s3cret", "wrong") + "/3"))
    try:
        await mux.execute("SET", "where", "db3")
        assert await user_client.get("where") == b"db3"
        assert await admin.get("where") is None  # db 0
        with pytest.raises(rx.AuthenticationError):
            await wrong.execute("PING")
    finally:
        await mux.aclose()
        await wrong.aclose()
        await user_client.aclose()
        await admin.acl_deluser("mux-test")
        await admin.aclose()


async def test_an_unreachable_server_is_a_connection_error() -> None:
    mux = RedisMux("127.0.0.1", 1, connect_timeout_s=0.5)
    with pytest.raises(rx.ConnectionError):
        await mux.execute("PING")


@pytest.fixture
def tls_dir() -> Iterator[Path]:
    # Not tmp_path: the container's redis user must traverse every parent directory.
    with tempfile.TemporaryDirectory(prefix="kvgate-redis-tls-") as name:
        path = Path(name)
        path.chmod(0o755)
        subprocess.run(
            ["bash", str(REPO / "deploy" / "make-tls-cert.sh"), name], check=True, capture_output=True
        )
        yield path


async def test_rediss_urls_get_a_tls_connection(tls_dir: Path) -> None:
    server = RedisServer(password="s3cret", tls_dir=tls_dir).start()
    try:
        client = redis.Redis.from_url(server.url)
        mux = RedisMux.like(client)
        try:
            assert await mux.execute("SET", "over", "tls") == b"OK"
            assert await client.get("over") == b"tls"  # redis-py over TLS sees what the mux wrote
        finally:
            await mux.aclose()
            await client.aclose()
        # Without the CA the server's certificate is refused.
        untrusting = redis.Redis.from_url(server.url.split("?")[0])
        with pytest.raises(rx.ConnectionError):
            await RedisMux.like(untrusting).execute("PING")
        await untrusting.aclose()
    finally:
        server.stop()
