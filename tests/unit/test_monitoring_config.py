"""The monitoring profile's config agrees with the code and with deploy/compose.yaml.

- Every PromQL expression of the Grafana dashboard names only metrics that kvgate's
  registries expose (or HAProxy's exporter), so a renamed metric cannot leave a blank panel.
- The dashboard JSON is well formed, and its panels use the provisioned datasource.
- prometheus.yml scrapes every compose service that serves metrics, with the right region.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

import gateway.metrics
import gpu_worker.metrics
import scheduler.metrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
MONITORING = DEPLOY / "monitoring"
COMPOSE = DEPLOY / "compose.yaml"
PROMETHEUS_YML = MONITORING / "prometheus.yml"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "kvgate-fleet.json"
DATASOURCES = MONITORING / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
DASHBOARD_PROVIDERS = MONITORING / "grafana" / "provisioning" / "dashboards" / "kvgate.yaml"

MONITORING_PROFILE = "monitoring"

# The fleet of deploy/compose.yaml: job -> {target: region label or None}.
EXPECTED_TARGETS: dict[str, dict[str, str | None]] = {
    "kvgate-scheduler": {"scheduler-1:9101": None, "scheduler-2:9101": None},
    "kvgate-gateway": {"gateway-1:9102": None, "gateway-2:9102": None},
    "kvgate-worker": {
        "worker-us-east-1:9100": "us-east",
        "worker-us-east-2:9100": "us-east",
        "worker-eu-west-1:9100": "eu-west",
        "worker-eu-west-2:9100": "eu-west",
        "worker-ap-south-1:9100": "ap-south",
        "worker-ap-south-2:9100": "ap-south",
    },
    "haproxy": {"lb:8404": None},
}

# Series that Prometheus itself attaches to every target.
PROMETHEUS_SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
HAPROXY_METRIC = re.compile(r"haproxy_[a-z0-9_]+")

PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or"}
PROMQL_KEYWORDS |= {"unless", "offset", "atan2", "inf", "nan"}


# ---------------------------------------------------------------------------- helpers


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def kvgate_metric_names() -> set[str]:
    """Sample names of the default registry once the three services' metrics modules are imported.

    Labelled metrics have no samples until first used, so names come from each family's type.
    """
    assert gateway.metrics and scheduler.metrics and gpu_worker.metrics  # imported for registration
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
        "info": ("_info",),
    }
    names: set[str] = set()
    for family in REGISTRY.collect():
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def metric_names_in(expr: str) -> set[str]:
    """Metric names referenced by a PromQL expression (Grafana variables allowed)."""
    e = re.sub(r"\$\{[^}]*\}|\$\w+", "X", expr)  # Grafana variables
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', e)  # string literals
    e = re.sub(r"\{[^}]*\}", "", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)  # range selectors and subqueries
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)  # label lists
    names = set()
    for m in re.finditer(r"(?<![\w:.])[A-Za-z_:][\w:]*", e):
        if m.group() in PROMQL_KEYWORDS or e[m.end() :].lstrip().startswith("("):
            continue  # keyword, or a function / aggregation call
        names.add(m.group())
    return names


def walk_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from walk_panels(panel.get("panels", []))  # panels inside collapsed rows


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and query variable."""
    exprs = []
    for panel in walk_panels(dashboard()["panels"]):
        for target in panel.get("targets", []):
            exprs.append((f"panel {panel['title']!r} target {target.get('refId')}", target["expr"]))
    for var in dashboard()["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\)\s*", query)
        exprs.append((f"variable {var['name']!r}", m.group(1) if m else query))
    return exprs


def scrape_targets() -> dict[str, tuple[str, dict[str, str]]]:
    """target -> (job, static labels) from prometheus.yml."""
    out: dict[str, tuple[str, dict[str, str]]] = {}
    for job in load_yaml(PROMETHEUS_YML)["scrape_configs"]:
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                assert target not in out, f"{target} is scraped twice"
                out[target] = (job["job_name"], dict(static.get("labels", {})))
    return out


def compose_services() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = load_yaml(COMPOSE)["services"]
    return services


def command_args(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    args = command.split() if isinstance(command, str) else [str(a) for a in command]
    # ${VAR:-default} / ${VAR-default} -> default (what compose uses when VAR is unset)
    return [re.sub(r"\$\{\w+:?-([^}]*)\}", r"\1", a) for a in args]


def flag(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
        if arg == name and i + 1 < len(args):
            return args[i + 1]
    return None


def metrics_services() -> dict[str, dict[str, Any]]:
    """Services of the default fleet (no profiles) that serve Prometheus metrics."""
    return {
        name: svc
        for name, svc in compose_services().items()
        if "profiles" not in svc and flag(command_args(svc), "--metrics-port") is not None
    }


def networks_of(service: dict[str, Any]) -> set[str]:
    nets = service.get("networks")
    if not nets:
        return {"default"}
    return set(nets)


def container_path(service: dict[str, Any], host_path: Path) -> str | None:
    """Where host_path appears inside the service's container, from its bind mounts."""
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            source, target = volume.get("source"), volume.get("target")
        else:
            parts = str(volume).split(":")
            if len(parts) < 2:
                continue
            source, target = parts[0], parts[1]
        if not source or not target or not str(source).startswith((".", "/")):
            continue  # a named volume
        src = (COMPOSE.parent / source).resolve()
        if host_path.resolve() == src:
            return str(target)
        if src in host_path.resolve().parents:
            return str(target).rstrip("/") + "/" + host_path.resolve().relative_to(src).as_posix()
    return None


def provisioned_datasource_uid() -> str:
    (source,) = load_yaml(DATASOURCES)["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    uid: str = source["uid"]
    return uid


# ---------------------------------------------------------------------------- the extractor itself


def test_metric_name_extraction_finds_names_and_skips_promql_syntax() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, region) "
        '(rate(a_bucket{job=~"x|y", le!="1"}[$__rate_interval])))'
        " / on (region) group_left (zone) b offset 5m + count(up == 0) or vector(0)"
    )
    assert metric_names_in(expr) == {"a_bucket", "b", "up"}
    assert metric_names_in("sum(kvgate_nope_total) / ignoring(x) 2e3") == {"kvgate_nope_total"}


# ---------------------------------------------------------------------------- dashboard


def test_dashboard_promql_names_only_metrics_that_exist() -> None:
    known = kvgate_metric_names() | PROMETHEUS_SYNTHETIC
    unknown = {
        (where, name)
        for where, expr in dashboard_exprs()
        for name in metric_names_in(expr)
        if name not in known and not HAPROXY_METRIC.fullmatch(name)
    }
    assert not unknown, f"metrics that no kvgate registry or HAProxy exposes: {sorted(unknown)}"


def test_dashboard_quantiles_use_histogram_buckets_and_worker_panels_follow_the_region_variable() -> None:
    for where, expr in dashboard_exprs():
        if "histogram_quantile" in expr:
            assert "_bucket" in expr and re.search(r"\bby\s*\([^)]*\ble\b", expr), where
        if "kvgate_worker_" in expr and not where.startswith("variable"):
            assert '$region"' in expr, f"{where} ignores the region variable: {expr}"


def test_dashboard_job_matchers_name_scrape_jobs() -> None:
    jobs = {job for job, _ in scrape_targets().values()}
    for where, expr in dashboard_exprs():
        for op, value in re.findall(r'\bjob\s*(=~|=)\s*"([^"]*)"', expr):
            pattern = value if op == "=~" else re.escape(value)
            assert any(re.fullmatch(pattern, j) for j in jobs), f"{where}: job {value!r} is not scraped"


def test_dashboard_json_is_well_formed() -> None:
    data = dashboard()
    assert data["uid"] == "kvgate-fleet"
    assert data["schemaVersion"] >= 36
    panels = list(walk_panels(data["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    titles = [p["title"] for p in panels]
    assert len(titles) == len(set(titles)), "duplicate panel titles"
    for p in panels:
        pos = p["gridPos"]
        assert pos["x"] + pos["w"] <= 24, p["title"]
        if p["type"] != "row":
            assert p["targets"], f"panel {p['title']!r} has no query"
            assert {t["refId"] for t in p["targets"]} == {chr(65 + i) for i in range(len(p["targets"]))}
    assert [v["name"] for v in data["templating"]["list"]] == ["region"]


def test_dashboard_uses_the_provisioned_datasource() -> None:
    uid = provisioned_datasource_uid()
    data = dashboard()
    refs = [("variable " + v["name"], v["datasource"]) for v in data["templating"]["list"]]
    for p in walk_panels(data["panels"]):
        if p["type"] == "row":
            continue
        refs.append((p["title"], p["datasource"]))
        refs.extend((f"{p['title']} {t['refId']}", t["datasource"]) for t in p["targets"])
    wrong = [(where, ds) for where, ds in refs if ds != {"type": "prometheus", "uid": uid}]
    assert not wrong, f"panels not on datasource uid {uid!r}: {wrong}"


# ---------------------------------------------------------------------------- prometheus.yml


def test_prometheus_scrapes_the_fleet_every_5s_with_job_and_region_labels() -> None:
    config = load_yaml(PROMETHEUS_YML)
    assert config["global"]["scrape_interval"] == "5s"
    targets = scrape_targets()
    for job, expected in EXPECTED_TARGETS.items():
        for target, region in expected.items():
            assert target in targets, f"{target} ({job}) is not scraped"
            got_job, labels = targets[target]
            assert got_job == job, target
            assert labels.get("region") == region, target
    kvgate_targets = {t for t, (job, _) in targets.items() if job in EXPECTED_TARGETS}
    assert kvgate_targets == {t for expected in EXPECTED_TARGETS.values() for t in expected}


def test_every_compose_service_with_a_metrics_port_is_scraped() -> None:
    services = metrics_services()
    assert services, "no service of deploy/compose.yaml has --metrics-port"
    targets = scrape_targets()
    missing = []
    for name, svc in sorted(services.items()):
        args = command_args(svc)
        target = f"{name}:{flag(args, '--metrics-port')}"
        if target not in targets:
            missing.append(target)
            continue
        region = flag(args, "--region")
        if region is not None:
            assert targets[target][1].get("region") == region, f"{target}: region label != --region"
    assert not missing, f"compose services whose metrics prometheus.yml does not scrape: {missing}"


def test_scrape_targets_are_compose_services() -> None:
    services = compose_services()
    for target, (job, _) in scrape_targets().items():
        host = target.rsplit(":", 1)[0]
        assert host == "localhost" or host in services, f"{job} scrapes {target}: no such compose service"


# ---------------------------------------------------------------------------- compose profile


def test_monitoring_profile_mounts_the_config_where_the_services_read_it() -> None:
    services = compose_services()
    for name in ("prometheus", "grafana"):
        assert name in services, f"deploy/compose.yaml has no {name} service"
        assert services[name].get("profiles") == [MONITORING_PROFILE], f"{name} must be profile-only"

    prometheus = services["prometheus"]
    config_path = flag(command_args(prometheus), "--config.file") or "/etc/prometheus/prometheus.yml"
    assert container_path(prometheus, PROMETHEUS_YML) == config_path

    grafana = services["grafana"]
    env = grafana.get("environment", {})
    env = dict(e.split("=", 1) for e in env) if isinstance(env, list) else env
    provisioning = env.get("GF_PATHS_PROVISIONING", "/etc/grafana/provisioning")
    assert container_path(grafana, DATASOURCES.parents[1]) == provisioning
    (provider,) = load_yaml(DASHBOARD_PROVIDERS)["providers"]
    assert container_path(grafana, DASHBOARD.parent) == provider["options"]["path"]

    # Prometheus must share a network with every service it scrapes, and with Grafana.
    reachable = networks_of(prometheus)
    scraped = {t.rsplit(":", 1)[0] for t in scrape_targets()} - {"localhost"}
    for name in sorted(scraped | {"grafana"}):
        assert networks_of(services[name]) & reachable, f"prometheus cannot reach {name}"


@pytest.mark.parametrize("path", [PROMETHEUS_YML, DATASOURCES, DASHBOARD_PROVIDERS])
def test_monitoring_yaml_parses(path: Path) -> None:
    assert isinstance(load_yaml(path), dict)
