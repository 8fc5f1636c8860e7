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


# The compose fleet's broker configuration (a source checkout's deploy/mosquitto).
DEPLOY_MOSQUITTO_DIR = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto"


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

    def __init__(
        self, password: str | None = None, tls_dir: Path | None = None, cluster: bool = False
    ) -> None:
        """`password`: require it (`requirepass`), as the compose fleet does. `tls_dir`: serve
        TLS only, with ca.crt, server.crt and server.key from it (deploy/make-tls-cert.sh).
        `cluster`: a one-node Redis Cluster owning every slot. A plain client works with it (no
        redirects), while Redis still refuses any command or script whose keys span two slots
        (CROSSSLOT): what tests need to show that kvgate's keys are Cluster-safe."""
        self.password = password
        self.tls_dir = tls_dir
        self.cluster = cluster
        options = f" --requirepass {password}" if password else ""
        if cluster:
            options += " --cluster-enabled yes --cluster-config-file /tmp/nodes.conf"
        listen = "--port 6379"
        container = DockerContainer(redis_image())
        if tls_dir is not None:
            listen = (
                "--port 0 --tls-port 6379 --tls-cert-file /tls/server.crt --tls-key-file /tls/server.key"
                " --tls-ca-cert-file /tls/ca.crt --tls-auth-clients no"
            )
            container = container.with_volume_mapping(str(tls_dir), "/tls", "ro")
        super().__init__(
            container.with_command(
                f"redis-server {listen} --bind 0.0.0.0 --protected-mode no --appendonly yes --save ''"
                + options
            )
        )

    def start(self) -> Self:
        super().start()
        if self.cluster:
            self._own_every_slot()
        return self

    def _own_every_slot(self, timeout_s: float = 30.0) -> None:
        cli = "redis-cli" + (f" -a {self.password} --no-auth-warning" if self.password else "")
        self.container.exec(f"{cli} CLUSTER ADDSLOTSRANGE 0 16383")
        deadline = time.monotonic() + timeout_s
        while b"cluster_state:ok" not in self.container.exec(f"{cli} CLUSTER INFO").output:
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis cluster not ok within {timeout_s}s")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls_dir is not None:
            # The test certificate names localhost, not the docker host's address: verify the
            # chain, not the name.
            query = f"?ssl_ca_certs={self.tls_dir / 'ca.crt'}&ssl_check_hostname=false"
            return f"rediss://{auth}{self.host}:{self.port}/0{query}"
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def direct_url(self) -> str:
        """`url`, but at the container's bridge address when this host routes to it (Linux
        Docker). The published port goes through docker-proxy, a userland relay that adds two
        hops and its own CPU to every command; a deployed service reaches Redis without one, so
        the benchmarks, which time Redis round trips, use this."""
        if self.tls_dir is not None:
            return self.url  # the certificate checks aside, TLS is not what the benchmarks time
        try:
            container = self.container
            ip = container.get_docker_client().bridge_ip(container.get_wrapped_container().id)
            with socket.create_connection((ip, self.port_inside), timeout=0.5):
                pass
        except Exception:  # any failure means: use the published port
            return self.url
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{ip}:{self.port_inside}/0"


class MosquittoServer(_Server):
    port_inside = 1883
    what = "mosquitto"

    def __init__(self, users: dict[str, str] | None = None) -> None:
        """Anonymous by default. With `users` ({name: password}) the broker runs the compose
        fleet's own configuration from deploy/mosquitto (password file + per-worker ACL), so
        tests exercise exactly what is deployed; needs a source checkout."""
        self._conf_dir = tempfile.TemporaryDirectory(prefix="kvgate-mosquitto-")
        container = DockerContainer(mosquitto_image())
        if users is None:
            conf = Path(self._conf_dir.name) / "mosquitto.conf"
            conf.write_text(MOSQUITTO_CONF)
            conf.chmod(0o644)
            Path(self._conf_dir.name).chmod(0o755)
            container = container.with_volume_mapping(str(conf), "/kvgate/mosquitto.conf", "ro")
            container = container.with_command("mosquitto -c /kvgate/mosquitto.conf")
        else:
            if not DEPLOY_MOSQUITTO_DIR.is_dir():
                raise FileNotFoundError(
                    f"{DEPLOY_MOSQUITTO_DIR} not found: a secured broker needs a checkout"
                )
            container = (
                container.with_volume_mapping(str(DEPLOY_MOSQUITTO_DIR), "/mosquitto/config", "ro")
                .with_env("KVGATE_MQTT_USERS", " ".join(f"{u}:{p}" for u, p in users.items()))
                .with_command("sh /mosquitto/config/start.sh")
            )
        super().__init__(container)

    def url_for(self, user: str | None = None, password: str | None = None) -> str:
        """mqtt:// URL of this broker, with credentials when given."""
        auth = f"{user}:{password}@" if user else ""
        return f"mqtt://{auth}{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return self.url_for()

    def stop(self) -> None:
        super().stop()
        self._conf_dir.cleanup()
