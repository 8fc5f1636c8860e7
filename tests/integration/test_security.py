"""The deployed security settings, on real containers: the broker's password file and
per-worker ACL (deploy/mosquitto, exactly as compose runs it) and a password-protected Redis."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator

import aiomqtt
import pytest
import redis
import redis.exceptions

from kvgate import topics
from kvgate.containers import MosquittoServer, RedisServer
from kvgate.mqtt_url import MqttUrl
from tests.integration.fleet import Fleet

USERS = {name: secrets.token_hex(8) for name in ("us-east-1", "eu-west-1", "kvgate-scheduler")}


@pytest.fixture(scope="module")
def secured_broker() -> Iterator[MosquittoServer]:
    server = MosquittoServer(users=USERS).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def secured_redis() -> Iterator[RedisServer]:
    server = RedisServer(password=secrets.token_hex(8)).start()
    yield server
    server.stop()


def _url(broker: MosquittoServer, user: str, password: str | None = None) -> MqttUrl:
    return MqttUrl.parse(broker.url_for(user, USERS[user] if password is None else password))


async def _connect_error(url: MqttUrl) -> str:
    """The broker's refusal (empty string if it let us in)."""
    try:
        async with url.client(f"probe-{secrets.token_hex(4)}", keepalive_s=5):
            return ""
    except aiomqtt.MqttError as exc:
        return str(exc)


async def test_broker_refuses_wrong_passwords_unknown_users_and_anonymous_clients(
    secured_broker: MosquittoServer,
) -> None:
    assert await _connect_error(_url(secured_broker, "us-east-1")) == ""
    for url in (
        _url(secured_broker, "us-east-1", password="not-the-password"),
        MqttUrl.parse(secured_broker.url_for("intruder", "whatever")),
        MqttUrl.parse(secured_broker.url),
    ):
        error = await _connect_error(url)
        assert "authori" in error.lower() or "not auth" in error.lower(), (url.redacted(), error)


async def test_a_worker_can_publish_only_its_own_telemetry(secured_broker: MosquittoServer) -> None:
    received: list[str] = []
    scheduler = _url(secured_broker, "kvgate-scheduler")
    worker = _url(secured_broker, "us-east-1")
    async with scheduler.client("probe-scheduler", keepalive_s=5) as sub:
        await sub.subscribe(f"{topics.PREFIX}/#", qos=1)
        async with worker.client("probe-us-east-1", keepalive_s=5) as pub:
            # The broker acknowledges a denied QoS 1 publish and drops it (MQTT 3.1.1), so
            # the subscriber is the only witness.
            await pub.publish(topics.topic("eu-west-1", topics.STATS), b"forged", qos=1)
            await pub.publish(topics.topic("eu-west-1", topics.STATUS), b"forged", qos=1, retain=True)
            await pub.publish(topics.topic("us-east-1", topics.STATS), b"mine", qos=1)

        async def collect() -> None:
            async for message in sub.messages:
                received.append(f"{message.topic.value}={message.payload!r}")
                if message.payload == b"mine":
                    return

        await asyncio.wait_for(collect(), timeout=10)
        await asyncio.sleep(0.5)  # anything forged would have been delivered before "mine"
    assert received == [f"{topics.topic('us-east-1', topics.STATS)}=b'mine'"]


async def test_the_scheduler_account_cannot_publish_worker_telemetry(secured_broker: MosquittoServer) -> None:
    received: list[bytes] = []
    async with _url(secured_broker, "eu-west-1").client("probe-reader", keepalive_s=5) as reader:
        # Workers read nothing either: this subscription is accepted but never delivers.
        await reader.subscribe(f"{topics.PREFIX}/#", qos=1)
        async with _url(secured_broker, "kvgate-scheduler").client("probe-sched", keepalive_s=5) as pub:
            await pub.publish(topics.topic("eu-west-1", topics.STATS), b"forged", qos=1)

        async def collect() -> None:
            async for message in reader.messages:
                received.append(bytes(message.payload))  # type: ignore[arg-type]

        with pytest.raises(TimeoutError):
            await asyncio.wait_for(collect(), timeout=1.5)
    assert received == []


def test_redis_refuses_unauthenticated_clients(secured_redis: RedisServer) -> None:
    anonymous = redis.Redis(host=secured_redis.host, port=secured_redis.port)
    with pytest.raises(redis.exceptions.AuthenticationError):
        anonymous.ping()
    anonymous.close()
    with redis.Redis.from_url(secured_redis.url) as authenticated:
        assert authenticated.ping()


@pytest.fixture
async def secured_fleet(secured_broker: MosquittoServer, secured_redis: RedisServer) -> AsyncIterator[Fleet]:
    with redis.Redis.from_url(secured_redis.url) as r:
        r.flushall()
    fleet = Fleet(redis_url=secured_redis.url, mqtt_url=_url_str(secured_broker, "kvgate-scheduler"))
    try:
        yield fleet
    finally:
        await fleet.stop()


def _url_str(broker: MosquittoServer, user: str, password: str | None = None) -> str:
    return broker.url_for(user, USERS[user] if password is None else password)


async def test_only_workers_with_their_own_credentials_join_the_fleet(
    secured_fleet: Fleet, secured_broker: MosquittoServer
) -> None:
    await secured_fleet.add_worker("us-east-1", "us-east", mqtt_url=_url_str(secured_broker, "us-east-1"))
    # Right user, wrong password: never connects.
    await secured_fleet.add_worker(
        "eu-west-1", "eu-west", mqtt_url=_url_str(secured_broker, "eu-west-1", password="stale")
    )
    # Valid credentials of another worker: connects, but the ACL drops everything it
    # publishes under its own worker id.
    await secured_fleet.add_worker("ap-south-1", "ap-south", mqtt_url=_url_str(secured_broker, "us-east-1"))
    await secured_fleet.start_control_plane()
    await secured_fleet.wait_for_workers({"us-east-1": "ready"})
    await asyncio.sleep(2.0)  # several stats intervals for the others to (not) show up
    status = await secured_fleet.fleet_status()
    assert [w.worker_id for w in status.workers] == ["us-east-1"]
    async with secured_fleet.client() as client:
        session = await client.create_session()
        text, done, placement = await client.reply(session.session_id, "hello over a locked-down fleet", 8)
    assert placement.worker_id == "us-east-1" and done.usage.completion_tokens == 8 and text
