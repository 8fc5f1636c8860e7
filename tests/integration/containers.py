"""Real Redis and Mosquitto in containers for the integration tests (testcontainers).

Image names come from the environment that `make images` writes
(deploy/.build/images.env): local images on a machine without a registry, the
public ones elsewhere. TESTCONTAINERS_RYUK_DISABLED=true is needed with local
images (Ryuk's own image cannot be pulled); the fixtures stop what they start.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from testcontainers.core.container import DockerContainer

REPO = Path(__file__).resolve().parents[2]
MOSQUITTO_CONF = REPO / "tests" / "integration" / "mosquitto-test.conf"


def redis_image() -> str:
    return os.environ.get("KVGATE_REDIS_IMAGE", "redis:7-bookworm")


def mosquitto_image() -> str:
    return os.environ.get("KVGATE_MOSQUITTO_IMAGE", "eclipse-mosquitto:2")


def _wait_for_port(host: str, port: int, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"{what} did not accept connections on {host}:{port} within {timeout_s}s")


class RedisServer:
    def __init__(self) -> None:
        self.container = (
            DockerContainer(redis_image())
            .with_command(
                "redis-server --port 6379 --bind 0.0.0.0 --protected-mode no --appendonly yes --save ''"
            )
            .with_exposed_ports(6379)
        )

    def start(self) -> RedisServer:
        self.container.start()
        _wait_for_port(self.host, self.port, "redis")
        return self

    @property
    def host(self) -> str:
        return self.container.get_container_host_ip()

    @property
    def port(self) -> int:
        return int(self.container.get_exposed_port(6379))

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def stop(self) -> None:
        self.container.stop()


class MosquittoServer:
    def __init__(self) -> None:
        self.container = (
            DockerContainer(mosquitto_image())
            .with_volume_mapping(str(MOSQUITTO_CONF), "/kvgate/mosquitto.conf", "ro")
            .with_command("mosquitto -c /kvgate/mosquitto.conf")
            .with_exposed_ports(1883)
        )

    def start(self) -> MosquittoServer:
        self.container.start()
        _wait_for_port(self.host, self.port, "mosquitto")
        return self

    @property
    def host(self) -> str:
        return self.container.get_container_host_ip()

    @property
    def port(self) -> int:
        return int(self.container.get_exposed_port(1883))

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def stop(self) -> None:
        self.container.stop()
