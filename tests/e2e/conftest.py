"""The compose fleet, brought up once for the e2e tests and torn down after them."""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "deploy" / "compose.yaml"


def compose_command() -> list[str]:
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    found = shutil.which("docker-compose")
    if found is None:
        pytest.fail("neither `docker compose` nor docker-compose is installed")
    return [found]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class ComposeFleet:
    project: str
    gateway: str
    env: dict[str, str]
    api_key: str = ""
    http_base_url: str = ""

    def compose(
        self, *args: str, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*compose_command(), "-p", self.project, "-f", str(COMPOSE_FILE), *args],
            env=self.env,
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
        )


def _create_key(fleet: ComposeFleet) -> str:
    """An API key minted inside the gateway container, the way an operator would."""
    deadline = time.monotonic() + 120
    while True:
        result = fleet.compose(
            "exec", "-T", "gateway", "kvgate", "keys", "create", "--tenant", "e2e", "--tier", "plus",
            check=False, timeout=60,
        )  # fmt: skip
        if result.returncode == 0 and result.stdout.strip():
            return result.stdout.strip()
        if time.monotonic() > deadline:
            pytest.fail(f"could not create an API key in the gateway container:\n{result.stderr}")
        time.sleep(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/e2e" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def compose_fleet() -> Iterator[ComposeFleet]:
    port = free_port()
    http_port = free_port()
    env = {**os.environ, "KVGATE_GATEWAY_PORT": str(port), "KVGATE_HTTP_PORT": str(http_port)}
    fleet = ComposeFleet(
        project=f"kvgate-e2e-{os.getpid()}",
        gateway=f"127.0.0.1:{port}",
        env=env,
        http_base_url=f"http://127.0.0.1:{http_port}/v1",
    )
    up = fleet.compose("up", "-d", check=False)
    try:
        if up.returncode != 0:
            pytest.fail(f"compose up failed:\n{up.stdout}\n{up.stderr}")
        yield dataclasses.replace(fleet, api_key=_create_key(fleet))
    finally:
        logs = fleet.compose("logs", "--no-color", "--tail", "40", check=False)
        print(logs.stdout[-20000:])
        fleet.compose("down", "-v", "--remove-orphans", "-t", "5", check=False)
