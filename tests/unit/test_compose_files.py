"""The compose files as docker-compose reads them: they merge, every long-running service is
health-checked and restarts, secrets only come from the environment, and each worker's broker
account is its own worker id on its own region's network."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
EMPTY_ENV = Path(__file__).with_name("empty.env")
SECRETS = {
    "KVGATE_REDIS_PASSWORD": "redis-secret",
    "KVGATE_MQTT_SCHEDULER_PASSWORD": "scheduler-secret",
    "KVGATE_MQTT_HEALTH_PASSWORD": "health-secret",
    **{
        f"KVGATE_MQTT_PASSWORD_{w}": f"{w.lower()}-secret"
        for w in ("US_EAST_1", "US_EAST_2", "EU_WEST_1", "EU_WEST_2", "AP_SOUTH_1", "AP_SOUTH_2")
    },
}


def _compose() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if (
        shutil.which("docker")
        and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    ):
        return ["docker", "compose"]
    pytest.fail("docker-compose is needed to check the compose files (.ci/run installs it)")


def _config(
    *files: str, env: dict[str, str] | None = None, profile: str = ""
) -> subprocess.CompletedProcess[str]:
    # An empty --env-file: a developer's own deploy/.env (make env) must not leak in.
    args = ["--env-file", str(EMPTY_ENV), *(a for f in files for a in ("-f", str(DEPLOY / f)))]
    if profile:
        args += ["--profile", profile]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KVGATE_")}
    return subprocess.run(
        [*_compose(), *args, "config"],
        env={**clean, **(SECRETS if env is None else env)},
        capture_output=True,
        text=True,
        cwd=DEPLOY,
    )


def _services(*files: str, profile: str = "") -> dict[str, Any]:
    result = _config(*files, profile=profile)
    assert result.returncode == 0, result.stderr
    services: dict[str, Any] = yaml.safe_load(result.stdout)["services"]
    return services


def test_the_fleet_needs_its_secrets() -> None:
    result = _config("compose.yaml", env={})
    assert result.returncode != 0 and "run make env" in result.stderr


def test_every_service_is_health_checked_and_restarts() -> None:
    services = _services("compose.yaml", profile="monitoring")
    assert {"lb", "scheduler-1", "scheduler-2", "gateway-1", "gateway-2", "prometheus", "grafana"} <= set(
        services
    )
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        assert service.get("restart") == "unless-stopped", f"{name} does not restart"


def test_secrets_come_only_from_the_environment() -> None:
    for name in ("compose.yaml", "compose.gpu.yaml"):
        text = (DEPLOY / name).read_text()
        for secret in SECRETS.values():
            assert secret not in text
    rendered = _config("compose.yaml").stdout
    assert "redis://:redis-secret@redis:6379/0" in rendered
    assert "--requirepass" in rendered and "redis-secret" in rendered


def _flag(command: list[str], name: str) -> str:
    return next(arg.split("=", 1)[1] for arg in command if arg.startswith(f"--{name}="))


@pytest.mark.parametrize("files", [("compose.yaml",), ("compose.yaml", "compose.gpu.yaml")])
def test_six_workers_in_three_isolated_regions_each_with_its_own_broker_account(
    files: tuple[str, ...],
) -> None:
    services = _services(*files)
    workers = {n: s for n, s in services.items() if n.startswith("worker-")}
    assert len(workers) == 6
    regions: dict[str, list[str]] = {}
    for name, service in workers.items():
        worker_id, region = _flag(service["command"], "worker-id"), _flag(service["command"], "region")
        assert name == f"worker-{worker_id}"
        assert _flag(service["command"], "advertise") == f"{name}:50061"
        assert list(service["networks"]) == [f"region-{region}"], f"{name} must only be on its region"
        secret = SECRETS[f"KVGATE_MQTT_PASSWORD_{worker_id.upper().replace('-', '_')}"]
        assert service["environment"]["KVGATE_MQTT_URL"] == f"mqtt://{worker_id}:{secret}@mosquitto:1883"
        regions.setdefault(region, []).append(worker_id)
    assert sorted(regions) == ["ap-south", "eu-west", "us-east"]
    # The gateways (Generate) and schedulers (Drain) reach every region; the broker too.
    for name in ("gateway-1", "gateway-2", "scheduler-1", "scheduler-2", "mosquitto"):
        assert {f"region-{r}" for r in regions} <= set(services[name]["networks"]), name


def test_sim_fleet_mixes_gpu_profiles_and_the_gpu_override_runs_vllm() -> None:
    sim = _services("compose.yaml")
    gpus = {_flag(s["command"], "gpu") for n, s in sim.items() if n.startswith("worker-")}
    assert gpus == {"h200", "a100"}
    gpu = _services("compose.yaml", "compose.gpu.yaml")
    for name, service in gpu.items():
        if name.startswith("worker-"):
            assert _flag(service["command"], "engine") == "vllm"
            devices = service["deploy"]["resources"]["reservations"]["devices"]
            assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


def test_the_broker_acl_confines_each_worker_to_its_own_topics() -> None:
    acl = (DEPLOY / "mosquitto" / "acl").read_text().splitlines()
    rules = [line.split() for line in acl if line.strip() and not line.startswith("#")]
    patterns = [r for r in rules if r[0] == "pattern"]
    assert patterns and all(r[1] == "write" and "/%u/" in r[2] for r in patterns)
    assert ["topic", "read", "kvgate/v1/workers/#"] in rules
    conf = (DEPLOY / "mosquitto" / "mosquitto.conf").read_text()
    assert "allow_anonymous false" in conf


def test_the_tls_override_serves_both_gateways_over_tls_and_checks_health_over_tls() -> None:
    services = _services("compose.yaml", "compose.tls.yaml")
    for name in ("gateway-1", "gateway-2"):
        command = services[name]["command"]
        assert (
            _flag(command, "tls-cert") == "/tls/server.crt" and _flag(command, "tls-key") == "/tls/server.key"
        )
        assert _flag(command, "scheduler") == "dns:///scheduler:50051"
        assert services[name]["healthcheck"]["test"][-2:] == ["--tls-ca", "/tls/ca.crt"]
        assert services[name]["healthcheck"]["interval"], "the override must keep the base healthcheck timing"
