"""The compose fleet, brought up once for the e2e tests and torn down after them, plus the
fault-injection tools and the summary table printed at the end of the run."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "deploy" / "compose.yaml"
MAKE_ENV = REPO / "deploy" / "make-env.sh"
HEALTH_FORMAT = "{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}"
WORKERS = ("us-east-1", "us-east-2", "eu-west-1", "eu-west-2", "ap-south-1", "ap-south-2")


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


def _secrets_env() -> dict[str, str]:
    """A fresh deploy/.env for this run (never the developer's own)."""
    with tempfile.TemporaryDirectory(prefix="kvgate-e2e-") as tmp:
        path = Path(tmp) / ".env"
        subprocess.run(["bash", str(MAKE_ENV), str(path)], check=True, capture_output=True)
        pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
        return {k: v for k, v in pairs if not k.startswith("#")}


@dataclass(frozen=True)
class ComposeFleet:
    project: str
    gateway: str  # the load balancer's published gRPC port
    env: dict[str, str]
    keys: dict[str, str] = field(default_factory=dict)  # tier -> API key
    http_base_url: str = ""
    # service -> container id: looked up once (docker-compose takes a second to start), so a
    # fault lands the moment the test asks for it. `docker start` keeps the id.
    _ids: dict[str, str] = field(default_factory=dict)

    @property
    def api_key(self) -> str:
        return self.keys["plus"]

    def compose(
        self, *args: str, check: bool = True, timeout: float = 300, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*compose_command(), "-p", self.project, "-f", str(COMPOSE_FILE), *args],
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
        )

    def container(self, service: str) -> str:
        if service not in self._ids:
            cid = self.compose("ps", "-q", service).stdout.strip()
            assert cid, f"no container for service {service}"
            self._ids[service] = cid
        return self._ids[service]

    def forget_containers(self) -> None:
        """After `compose up` re-created containers."""
        self._ids.clear()

    def docker(self, *args: str, timeout: float = 120) -> str:
        return subprocess.run(
            ["docker", *args], capture_output=True, text=True, check=True, timeout=timeout
        ).stdout

    def fleet_status(self) -> dict[str, Any]:
        """What the scheduler replicas see (FleetStatus as JSON), asked inside scheduler-1... or -2."""
        for scheduler in ("scheduler-1", "scheduler-2"):
            result = self.compose(
                "exec", "-T", scheduler, "kvgate", "status", "--scheduler", "localhost:50051", "--json",
                check=False, timeout=60,
            )  # fmt: skip
            if result.returncode == 0:
                status: dict[str, Any] = json.loads(result.stdout)
                return status
        raise AssertionError(f"no scheduler answered FleetStatus: {result.stderr}")

    def worker_states(self) -> dict[str, str]:
        return {w["workerId"]: w.get("state", "") for w in self.fleet_status().get("workers", [])}

    def wait_for_states(self, expected: dict[str, str], timeout_s: float = 90) -> float:
        """Seconds until the scheduler sees every worker in its expected state."""
        started = time.monotonic()
        seen: dict[str, str] = {}
        while time.monotonic() - started < timeout_s:
            seen = self.worker_states()
            if all(seen.get(w) == state for w, state in expected.items()):
                return time.monotonic() - started
            time.sleep(0.5)
        raise AssertionError(f"workers not {expected} within {timeout_s}s; scheduler sees {seen}")

    def wait_healthy(self, *services: str, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        for service in services:
            while True:
                health = self.docker("inspect", "-f", HEALTH_FORMAT, self.container(service)).strip()
                if health in ("healthy", "running"):
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"{service} not healthy within {timeout_s}s ({health})")
                time.sleep(1)


def _create_key(fleet: ComposeFleet, tier: str) -> str:
    """An API key minted inside a gateway container, the way an operator would."""
    deadline = time.monotonic() + 120
    while True:
        result = fleet.compose(
            "exec", "-T", "gateway-1", "kvgate", "keys", "create", "--tenant", f"e2e-{tier}", "--tier", tier,
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
    env = {
        **os.environ,
        **_secrets_env(),
        "KVGATE_GATEWAY_PORT": str(port),
        "KVGATE_HTTP_PORT": str(http_port),
    }
    fleet = ComposeFleet(
        project=f"kvgate-e2e-{os.getpid()}",
        gateway=f"127.0.0.1:{port}",
        env=env,
        http_base_url=f"http://127.0.0.1:{http_port}/v1",
    )
    up = fleet.compose("up", "-d", check=False, timeout=600)
    try:
        if up.returncode != 0:
            pytest.fail(f"compose up failed:\n{up.stdout}\n{up.stderr}")
        keys = {tier: _create_key(fleet, tier) for tier in ("free", "plus", "enterprise")}
        fleet = dataclasses.replace(fleet, keys=keys)
        fleet.wait_for_states(dict.fromkeys(WORKERS, "ready"))
        for service in ("redis", "mosquitto", "gateway-1", "gateway-2", "scheduler-1", "scheduler-2"):
            fleet.container(service)
        for w in WORKERS:
            fleet.container(f"worker-{w}")
        yield fleet
    finally:
        logs = fleet.compose("logs", "--no-color", "--tail", "25", check=False)
        print(logs.stdout[-30000:])
        fleet.compose("down", "-v", "--remove-orphans", "-t", "5", check=False)


@dataclass
class FaultRow:
    fault: str
    requests: int = 0
    errors: int = 0
    resumed: int = 0
    lost_turns: int = 0
    note: str = ""


FAULT_ROWS: list[FaultRow] = []


@pytest.fixture
def fault_row(request: pytest.FixtureRequest) -> Iterator[FaultRow]:
    """One line of the end-of-run summary table, filled in by a fault-injection test."""
    row = FaultRow(fault=request.node.name.removeprefix("test_"))
    yield row
    FAULT_ROWS.append(row)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not FAULT_ROWS:
        return
    terminalreporter.section("fault injection summary")
    header = f"{'fault':<48} {'requests':>8} {'errors':>6} {'resumed':>7} {'lost turns':>10}  note"
    terminalreporter.write_line(header)
    for r in FAULT_ROWS:
        terminalreporter.write_line(
            f"{r.fault:<48} {r.requests:>8} {r.errors:>6} {r.resumed:>7} {r.lost_turns:>10}  {r.note}"
        )
