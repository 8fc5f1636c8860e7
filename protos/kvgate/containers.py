"""Throwaway Redis and Mosquitto containers for the integration tests and the benchmarks.

Needs the `dev` extra (testcontainers).

Image names come from the environment that `make images` writes
(deploy/.build/images.env): local images on a machine without a registry, the
public ones elsewhere. TESTCONTAINERS_RYUK_DISABLED=true is needed with local
images (Ryuk's own image cannot be pulled); the fixtures stop what they start.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Self

from testcontainers.core.container import DockerContainer

# One anonymous listener (the compose fleet adds passwords and ACLs). Debian's mosquitto does
# not flush stdout, so it logs to stderr to reach `docker logs`.
MOSQUITTO_CONF = """listener 1883 0.0.0.0
allow_anonymous true
persistence false
log_dest stderr
"""


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


class _Server:
    """One container serving one TCP port, reachable from the host."""

    port_inside: int
    what: str

    def __init__(self, container: DockerContainer) -> None:
        self.container = container.with_exposed_ports(self.port_inside)

    def start(self) -> Self:
        self.container.start()
        _wait_for_port(self.host, self.port, self.what)
        return self

    @property
    def host(self) -> str:
        return self.container.get_container_host_ip()

    @property
    def port(self) -> int:
        return int(self.container.get_exposed_port(self.port_inside))

    def stop(self) -> None:
        self.container.stop()


class RedisServer(_Server):
    port_inside = 6379
    what = "redis"

    def __init__(self) -> None:
        super().__init__(
            DockerContainer(redis_image()).with_command(
                "redis-server --port 6379 --bind 0.0.0.0 --protected-mode no --appendonly yes --save ''"
            )
        )

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"


class MosquittoServer(_Server):
    port_inside = 1883
    what = "mosquitto"

    def __init__(self) -> None:
        self._conf_dir = tempfile.TemporaryDirectory(prefix="kvgate-mosquitto-")
        conf = Path(self._conf_dir.name) / "mosquitto.conf"
        conf.write_text(MOSQUITTO_CONF)
        conf.chmod(0o644)
        Path(self._conf_dir.name).chmod(0o755)
        super().__init__(
            DockerContainer(mosquitto_image())
            .with_volume_mapping(str(conf), "/kvgate/mosquitto.conf", "ro")
            .with_command("mosquitto -c /kvgate/mosquitto.conf")
        )

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def stop(self) -> None:
        super().stop()
        self._conf_dir.cleanup()
