"""deploy/k8s: every overlay renders with kustomize and passes the Kubernetes schema (strict, offline)
and kvgate's own checks (deploy/k8s/validate.py); and broken manifests are caught."""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load_validate() -> ModuleType:
    spec = importlib.util.spec_from_file_location("k8s_validate", REPO / "deploy" / "k8s" / "validate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


validate = _load_validate()

if not (shutil.which("kubectl") or shutil.which("kustomize")):
    pytest.skip(
        "deploy/k8s checks need kubectl (>= 1.27, kustomize v5 built in) or kustomize on PATH",
        allow_module_level=True,
    )
pytest.importorskip(
    "kubernetes_validate", reason="deploy/k8s checks need the kubernetes-validate package (dev extra)"
)

Obj = dict[str, Any]


def test_both_overlays_exist() -> None:
    assert {p.name for p in validate.overlays()} >= {"sim", "multi-region"}


@pytest.mark.parametrize("overlay", validate.overlays(), ids=lambda p: p.name)
def test_overlay_renders_and_validates(overlay: Path) -> None:
    assert validate.check(overlay) == []


@pytest.fixture(scope="module")
def sim() -> list[Obj]:
    objects: list[Obj] = validate.render(REPO / "deploy" / "k8s" / "overlays" / "sim")
    return objects


def _find(objects: list[Obj], kind: str, name: str) -> Obj:
    for obj in objects:
        if obj["kind"] == kind and obj["metadata"]["name"].startswith(name):
            return obj
    raise AssertionError(f"{kind}/{name} not rendered")


def _container(objects: list[Obj], kind: str, name: str) -> Obj:
    container: Obj = _find(objects, kind, name)["spec"]["template"]["spec"]["containers"][0]
    return container


def _env(container: Obj, name: str) -> Obj:
    return next(e for e in container["env"] if e["name"] == name)


def _replace_arg(container: Obj, prefix: str, new: str) -> None:
    args = container["args"]
    args[next(i for i, a in enumerate(args) if a.startswith(prefix))] = new


def _set(kind: str, name: str, path: list[str | int], value: Any) -> Callable[[list[Obj]], None]:
    """A breaker that sets one field of one rendered object."""

    def apply(objects: list[Obj]) -> None:
        node: Any = _find(objects, kind, name)
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return apply


CONTAINER: list[str | int] = ["spec", "template", "spec", "containers", 0]
SCHEMA_BREAKS = {
    "port is not an integer": (
        _set("Deployment", "kvgate-gateway", [*CONTAINER, "ports", 0, "containerPort"], "fifty"),
        "schema",
    ),
    "misspelt field": (_set("Deployment", "kvgate-scheduler", [*CONTAINER, "readinesProbe"], {}), "schema"),
    "bad PDB": (_set("PodDisruptionBudget", "kvgate-gateway", ["spec", "maxUnavailable"], [1]), "schema"),
}


@pytest.mark.parametrize("name", SCHEMA_BREAKS)
def test_schema_catches(sim: list[Obj], name: str) -> None:
    objects = copy.deepcopy(sim)
    breaker, expected = SCHEMA_BREAKS[name]
    breaker(objects)
    problems = validate.schema_problems(objects, versions=("1.37",))
    assert problems and all(expected in p for p in problems), problems


def _typo_in_args(objects: list[Obj]) -> None:
    _replace_arg(_container(objects, "Deployment", "kvgate-scheduler"), "--policy", "--polcy=kvgate")


def _undefined_var(objects: list[Obj]) -> None:
    _replace_arg(
        _container(objects, "Deployment", "kvgate-scheduler"), "--replica-id", "--replica-id=$(POD_NAMEE)"
    )


def _wrong_secret_key(objects: list[Obj]) -> None:
    _env(_container(objects, "Deployment", "kvgate-gateway"), "REDIS_PASSWORD")["valueFrom"]["secretKeyRef"][
        "key"
    ] = "passwd"


def _unknown_service(objects: list[Obj]) -> None:
    _replace_arg(
        _container(objects, "Deployment", "kvgate-gateway"),
        "--scheduler",
        "--scheduler=dns:///kvgate-sched.kvgate.svc.cluster.local:50051",
    )


def _mqtt_url_without_password(objects: list[Obj]) -> None:
    _env(_container(objects, "Deployment", "kvgate-scheduler"), "KVGATE_MQTT_URL")["value"] = (
        "mqtt://kvgate-mosquitto.kvgate.svc.cluster.local:1883"
    )


def _worker_env_order(objects: list[Obj]) -> None:
    # KVGATE_MQTT_URL uses $(MQTT_PASSWORD): moving it first leaves the reference unexpanded.
    env = _container(objects, "StatefulSet", "kvgate-worker-us")["env"]
    url = _env({"env": env}, "KVGATE_MQTT_URL")
    env.remove(url)
    env.insert(0, url)


def _misspelt_url_variable(objects: list[Obj]) -> None:
    # The gateway would fall back to redis://localhost:6379/0.
    _env(_container(objects, "Deployment", "kvgate-gateway"), "KVGATE_REDIS_URL")["name"] = "KVGATE_REDIS_URI"


LINT_BREAKS: dict[str, tuple[Callable[[list[Obj]], None], str]] = {
    "typo in kvgate args": (_typo_in_args, "unrecognized arguments: --polcy=kvgate"),
    "undefined $(VAR)": (_undefined_var, "$(POD_NAMEE) is not defined"),
    "missing Secret key": (_wrong_secret_key, "has no key 'passwd'"),
    "unknown Service host": (_unknown_service, "no Service kvgate/kvgate-sched"),
    "MQTT URL without password": (_mqtt_url_without_password, "--mqtt-url: no user name and password"),
    "env defined after use": (_worker_env_order, "$(POD_NAME) is not defined"),
    "misspelt URL variable": (_misspelt_url_variable, "--redis-url: no password"),
    "Service selects nothing": (
        _set("Service", "kvgate-scheduler", ["spec", "selector", "app.kubernetes.io/component"], "schedulr"),
        "Service/kvgate-scheduler: selects no pod",
    ),
    "grace too short for drain": (
        _set(
            "StatefulSet",
            "kvgate-worker-eu",
            ["spec", "template", "spec", "terminationGracePeriodSeconds"],
            30,
        ),
        "terminationGracePeriodSeconds 30 < drain time 60",
    ),
    "writable root filesystem": (
        _set(
            "Deployment", "kvgate-gateway", [*CONTAINER, "securityContext", "readOnlyRootFilesystem"], False
        ),
        "readOnlyRootFilesystem must be true",
    ),
    "no memory limit": (
        _set("Deployment", "kvgate-scheduler", [*CONTAINER, "resources", "limits"], {"cpu": "1"}),
        "no memory limit",
    ),
    "pool larger than its MQTT users": (
        _set("StatefulSet", "kvgate-worker-us", ["spec", "replicas"], 9),
        "admits 4 workers of pool us, not 9",
    ),
    "grpc probe on an undeclared port": (
        _set("Deployment", "kvgate-gateway", [*CONTAINER, "readinessProbe", "grpc", "port"], 50099),
        "readinessProbe port 50099 not declared",
    ),
}


def test_sim_overlay_is_lint_clean(sim: list[Obj]) -> None:
    assert validate.lint_problems(sim) == []


@pytest.mark.parametrize("name", LINT_BREAKS)
def test_lint_catches(sim: list[Obj], name: str) -> None:
    objects = copy.deepcopy(sim)
    breaker, expected = LINT_BREAKS[name]
    breaker(objects)
    problems = validate.lint_problems(objects)
    assert any(expected in p for p in problems), problems


def test_check_fails_on_a_broken_overlay(tmp_path: Path) -> None:
    """End to end through kustomize: an overlay of the sim overlay with one mistake."""
    sim_dir = os.path.relpath(REPO / "deploy" / "k8s" / "overlays" / "sim", tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\n"
        "kind: Kustomization\n"
        f"resources:\n  - {sim_dir}\n"
        "patches:\n"
        "  - target: {kind: Deployment, name: kvgate-gateway}\n"
        "    patch: |-\n"
        "      - op: add\n"
        "        path: /spec/template/spec/containers/0/args/-\n"
        "        value: --grace=ninety\n"
        "      - op: replace\n"
        "        path: /spec/template/spec/containers/0/ports/0/containerPort\n"
        "        value: fifty\n"
    )
    problems = validate.check(tmp_path)
    assert any("argument --grace: invalid float value: 'ninety'" in p for p in problems), problems
    assert any("schema" in p and "containerPort" in p for p in problems), problems


def test_check_reports_a_kustomize_failure(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources:\n  - missing.yaml\n")
    problems = validate.check(tmp_path)
    assert len(problems) == 1 and "failed" in problems[0], problems
