#!/usr/bin/env python3
"""Render the kvgate Kubernetes manifests and check them offline.

    python deploy/k8s/validate.py                           # every overlay in deploy/k8s/overlays
    python deploy/k8s/validate.py deploy/k8s/overlays/sim   # one kustomization

Each kustomization is rendered with `kubectl kustomize` (kustomize v5 is built into kubectl; a
standalone `kustomize build` is used when there is no kubectl), then:

1. **schema**: every object is validated against the Kubernetes OpenAPI schema of each version in
   K8S_VERSIONS, strictly (an unknown or misspelt field is an error), with the JSON schemas bundled
   in the `kubernetes-validate` wheel: no cluster, no network;
2. **kvgate lint**: what a schema cannot see —
   - the args of every kvgate container parse with the real `kvgate` CLI parser, after the
     $(VAR) expansion the kubelet does; every $(VAR) is defined (the kubelet would leave an
     undefined one in place, silently); the MQTT and Redis URLs parse;
   - every ConfigMap, Secret, Secret key and PVC a pod uses is rendered, or is one of the
     out-of-band Secrets documented in README.md (EXTERNAL_SECRETS) with a documented key;
   - every Service, PodDisruptionBudget and NetworkPolicy selector selects some pod; every
     workload of more than one replica has a PodDisruptionBudget;
   - every *.svc.cluster.local name in args, env and ConfigMaps is a rendered Service (a headless
     one for per-pod names), and its port is one of the Service's;
   - probes name container ports; terminationGracePeriodSeconds covers --grace / --drain-grace
     plus any preStop sleep;
   - hardening: non-root, no privilege escalation, read-only root filesystem, all capabilities
     dropped, seccomp RuntimeDefault, CPU and memory requests and a memory limit;
   - worker pools: the headless Service of each worker StatefulSet, KVGATE_WORKER_SERVICE, the
     MQTT password key worker-<pool>, and a kvgate-mqtt-pools line admitting every replica.

Prints one line per problem; exit status 0 when there is none, 1 otherwise, 2 when a tool is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
OVERLAYS = HERE / "overlays"

# Oldest and newest Kubernetes minor versions the manifests must be valid for. 1.27 is the first
# with GA gRPC probes; 1.37 is the newest schema kubernetes-validate bundles at the time of writing.
K8S_VERSIONS = ("1.27", "1.37")

# Secrets created out of band (README.md, "Secrets"): name -> keys every overlay may use. The
# kvgate-mqtt keys worker-<pool> are checked against the pools in kvgate-mqtt-pools instead.
EXTERNAL_SECRETS: dict[str, set[str]] = {
    "kvgate-redis": {"password"},
    "kvgate-mqtt": {"scheduler"},
}

Obj = dict[str, Any]
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet")
SVC_HOST = re.compile(r"\b((?:[a-z0-9]([-a-z0-9]*[a-z0-9])?\.)+svc\.cluster\.local)(?::(\d+))?")
VAR_REF = re.compile(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


class ToolMissing(RuntimeError):
    pass


def overlays() -> list[Path]:
    return sorted(p.parent for p in OVERLAYS.glob("*/kustomization.yaml"))


def renderer() -> list[str]:
    """The command that renders a kustomization directory (the directory is appended)."""
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    raise ToolMissing("neither kubectl nor kustomize is on PATH (kubectl >= 1.27 has kustomize v5 built in)")


def render(directory: Path) -> list[Obj]:
    import yaml

    command = [*renderer(), str(directory)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise ValueError(f"{' '.join(command)} failed: {done.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def describe(obj: Obj) -> str:
    meta = obj.get("metadata", {})
    return f"{obj.get('kind')}/{meta.get('name')}"


# ---------------------------------------------------------------------------------------- schema


def schema_problems(objects: list[Obj], versions: tuple[str, ...] = K8S_VERSIONS) -> list[str]:
    try:
        import kubernetes_validate
    except ImportError as exc:
        raise ToolMissing("the Python package kubernetes-validate is not installed") from exc
    problems = []
    for obj in objects:
        for version in versions:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                where = "/".join(str(p) for p in exc.path) or "(top)"
                problems.append(f"{describe(obj)}: schema {version}: {where}: {exc.message}")
                break  # the same mistake is usually reported by every version
            except kubernetes_validate.SchemaNotFoundError:
                problems.append(f"{describe(obj)}: schema {version}: no schema for {obj.get('apiVersion')}")
                break
    return problems


# ------------------------------------------------------------------------------------------ lint


def pod_template(obj: Obj) -> Obj | None:
    if obj.get("kind") in WORKLOADS:
        template: Obj = obj["spec"]["template"]
        return template
    return None


def containers(pod_spec: Obj) -> Iterator[Obj]:
    yield from pod_spec.get("initContainers", [])
    yield from pod_spec.get("containers", [])


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


class Lint:
    def __init__(self, objects: list[Obj]) -> None:
        self.objects = objects
        self.problems: list[str] = []
        self.by_kind: dict[str, dict[tuple[str, str], Obj]] = {}
        for obj in objects:
            meta = obj.get("metadata", {})
            key = (meta.get("namespace", ""), meta.get("name", ""))
            self.by_kind.setdefault(obj["kind"], {})[key] = obj
        self.pools = self._pools()

    def problem(self, obj: Obj, text: str) -> None:
        self.problems.append(f"{describe(obj)}: {text}")

    def get(self, kind: str, namespace: str, name: str) -> Obj | None:
        return self.by_kind.get(kind, {}).get((namespace, name))

    def _pools(self) -> dict[str, int]:
        pools: dict[str, int] = {}
        for (_, name), cm in self.by_kind.get("ConfigMap", {}).items():
            if name.startswith("kvgate-mqtt-pools"):
                for line in cm.get("data", {}).get("pools", "").splitlines():
                    fields = line.split()
                    if len(fields) == 2 and not fields[0].startswith("#"):
                        pools[fields[0]] = int(fields[1])
        return pools

    def run(self) -> list[str]:
        workloads = [o for o in self.objects if pod_template(o) is not None]
        for obj in workloads:
            self.workload(obj)
        self.selectors(workloads)
        for cm in self.by_kind.get("ConfigMap", {}).values():
            for value in cm.get("data", {}).values():
                self.hosts(cm, cm["metadata"].get("namespace", ""), value)
        return self.problems

    # -- per workload

    def workload(self, obj: Obj) -> None:
        namespace = obj["metadata"].get("namespace", "")
        template = pod_template(obj)
        assert template is not None
        spec = template["spec"]
        pod_sc = spec.get("securityContext", {})
        if pod_sc.get("runAsNonRoot") is not True:
            self.problem(obj, "pod securityContext.runAsNonRoot must be true")
        if pod_sc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            self.problem(obj, "pod securityContext.seccompProfile.type must be RuntimeDefault")
        self.volumes(obj, namespace, spec)
        for container in containers(spec):
            self.container(obj, namespace, spec, container)
        if (
            obj["kind"] == "StatefulSet"
            and template["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"
        ):
            self.worker_pool(obj, namespace, spec)

    def volumes(self, obj: Obj, namespace: str, spec: Obj) -> None:
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                self.ref(obj, "ConfigMap", namespace, volume["configMap"]["name"], None)
            if "secret" in volume:
                self.ref(obj, "Secret", namespace, volume["secret"]["secretName"], None)
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                templates = {t["metadata"]["name"] for t in obj["spec"].get("volumeClaimTemplates", [])}
                if claim not in templates and self.get("PersistentVolumeClaim", namespace, claim) is None:
                    self.problem(
                        obj, f"volume {volume['name']}: PersistentVolumeClaim {claim} is not rendered"
                    )

    def ref(self, obj: Obj, kind: str, namespace: str, name: str, key: str | None) -> None:
        target = self.get(kind, namespace, name)
        if target is None:
            if kind == "Secret" and name in EXTERNAL_SECRETS:
                allowed = EXTERNAL_SECRETS[name] | (
                    {f"worker-{pool}" for pool in self.pools} if name == "kvgate-mqtt" else set()
                )
                if key is not None and key not in allowed:
                    self.problem(obj, f"out-of-band Secret {name} has no documented key {key!r}")
                return
            self.problem(obj, f"{kind} {name} is neither rendered nor a documented out-of-band Secret")
            return
        if key is not None:
            data = {**target.get("data", {}), **target.get("stringData", {})}
            if key not in data:
                self.problem(obj, f"{kind} {name} has no key {key!r}")

    def container(self, obj: Obj, namespace: str, spec: Obj, container: Obj) -> None:
        name = container["name"]
        sc = container.get("securityContext", {})
        if sc.get("allowPrivilegeEscalation") is not False:
            self.problem(obj, f"container {name}: allowPrivilegeEscalation must be false")
        if sc.get("readOnlyRootFilesystem") is not True:
            self.problem(obj, f"container {name}: readOnlyRootFilesystem must be true")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            self.problem(obj, f"container {name}: capabilities.drop must include ALL")
        resources = container.get("resources", {})
        for need in ("cpu", "memory"):
            if need not in resources.get("requests", {}):
                self.problem(obj, f"container {name}: no {need} request")
        if "memory" not in resources.get("limits", {}):
            self.problem(obj, f"container {name}: no memory limit")
        ports = {p.get("name") for p in container.get("ports", [])} | {
            p["containerPort"] for p in container.get("ports", [])
        }
        for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container.get(probe_name)
            if probe:
                for kind in ("grpc", "tcpSocket", "httpGet"):
                    if kind in probe and probe[kind]["port"] not in ports:
                        self.problem(
                            obj, f"container {name}: {probe_name} port {probe[kind]['port']} not declared"
                        )
        env = self.env(obj, namespace, container)
        args = [self.expand(obj, name, arg, env) for arg in container.get("args", [])]
        for value in [*env.values(), *args]:
            self.hosts(obj, namespace, value)
        if "kvgate" in str(container.get("image", "")) and args:
            self.kvgate_args(obj, spec, container, args, env)

    def env(self, obj: Obj, namespace: str, container: Obj) -> dict[str, str]:
        """The container's environment as the kubelet builds it: $(VAR) in a value expands only
        variables defined above it."""
        pod_name = obj["metadata"]["name"] + ("-0" if obj["kind"] == "StatefulSet" else "-6d4cf56db6-x7k2p")
        env: dict[str, str] = {}
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = self.expand(obj, container["name"], item["value"], env)
                continue
            source = item.get("valueFrom", {})
            if "fieldRef" in source:
                path = source["fieldRef"]["fieldPath"]
                env[item["name"]] = {"metadata.name": pod_name, "metadata.namespace": namespace}.get(
                    path, "x"
                )
            elif "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                self.ref(obj, "Secret", namespace, ref["name"], ref["key"])
                env[item["name"]] = "0123456789abcdef0123456789abcdef"
            elif "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                self.ref(obj, "ConfigMap", namespace, ref["name"], ref["key"])
                env[item["name"]] = "x"
            else:
                env[item["name"]] = "x"
        return env

    def expand(self, obj: Obj, container: str, text: str, env: dict[str, str]) -> str:
        def one(match: re.Match[str]) -> str:
            var = match.group(1)
            if var not in env:
                self.problem(obj, f"container {container}: $({var}) is not defined (before use)")
                return match.group(0)
            return env[var]

        return VAR_REF.sub(one, text)

    def kvgate_args(self, obj: Obj, spec: Obj, container: Obj, args: list[str], env: dict[str, str]) -> None:
        parsed = parse_kvgate_args(args, env)
        if isinstance(parsed, str):
            self.problem(obj, f"container {container['name']}: kvgate {' '.join(args)}: {parsed}")
            return
        grace = float(getattr(parsed, "grace", 0) or 0) + float(getattr(parsed, "drain_grace", 0) or 0)
        pre_stop = container.get("lifecycle", {}).get("preStop", {})
        command = pre_stop.get("exec", {}).get("command", [])
        if len(command) == 2 and command[0] == "sleep":
            grace += float(command[1])
        budget = spec.get("terminationGracePeriodSeconds", 30)
        if budget < grace:
            self.problem(obj, f"terminationGracePeriodSeconds {budget} < drain time {grace:g} s")
        # The URLs in effect (from args or, by default, KVGATE_MQTT_URL / KVGATE_REDIS_URL): a
        # misspelt variable would leave the built-in localhost default, which has no password.
        for option, url_check in (("mqtt_url", check_mqtt_url), ("redis_url", check_redis_url)):
            if hasattr(parsed, option):
                error = url_check(getattr(parsed, option))
                if error:
                    self.problem(obj, f"container {container['name']}: --{option.replace('_', '-')}: {error}")

    def hosts(self, obj: Obj, namespace: str, text: str) -> None:
        for match in SVC_HOST.finditer(text):
            parts = match.group(1).split(".")
            at = len(parts) - 3  # index of "svc"
            if at < 2:
                self.problem(obj, f"{match.group(0)}: not <service>.<namespace>.svc.cluster.local")
                continue
            service_name, service_ns = parts[at - 2], parts[at - 1]
            service = self.get("Service", service_ns, service_name)
            if service is None:
                self.problem(obj, f"{match.group(0)}: no Service {service_ns}/{service_name} is rendered")
                continue
            if at > 2 and service["spec"].get("clusterIP") != "None":
                self.problem(obj, f"{match.group(0)}: a per-pod name needs a headless Service")
            port = match.group(3)
            if port and int(port) not in {p["port"] for p in service["spec"].get("ports", [])}:
                self.problem(obj, f"{match.group(0)}: Service {service_name} has no port {port}")

    def worker_pool(self, obj: Obj, namespace: str, spec: Obj) -> None:
        name = obj["metadata"]["name"]
        service_name = obj["spec"].get("serviceName", "")
        service = self.get("Service", namespace, service_name)
        if service is None or service["spec"].get("clusterIP") != "None":
            self.problem(obj, f"serviceName {service_name} is not a rendered headless Service")
        pool = name.removeprefix("kvgate-worker-")
        if pool == name:
            self.problem(obj, "a worker StatefulSet must be named kvgate-worker-<pool> (its MQTT users)")
            return
        replicas = obj["spec"].get("replicas", 1)
        if pool not in self.pools:
            self.problem(obj, f"pool {pool} is not in kvgate-mqtt-pools: its workers cannot log in to MQTT")
        elif self.pools[pool] < replicas:
            self.problem(
                obj, f"kvgate-mqtt-pools admits {self.pools[pool]} workers of pool {pool}, not {replicas}"
            )
        for container in spec.get("containers", []):
            values = {e["name"]: e for e in container.get("env", [])}
            if values.get("KVGATE_WORKER_SERVICE", {}).get("value") != service_name:
                self.problem(obj, f"KVGATE_WORKER_SERVICE must be {service_name}")
            key = values.get("MQTT_PASSWORD", {}).get("valueFrom", {}).get("secretKeyRef", {}).get("key")
            if key != f"worker-{pool}":
                self.problem(obj, f"MQTT_PASSWORD must come from key worker-{pool}, not {key}")

    # -- across objects

    def selectors(self, workloads: list[Obj]) -> None:
        pods = [
            (o["metadata"].get("namespace", ""), pod_template(o)["metadata"].get("labels", {}), o)  # type: ignore[index]
            for o in workloads
        ]

        def selected(namespace: str, selector: dict[str, Any]) -> list[Obj]:
            return [o for ns, labels, o in pods if ns == namespace and matches(selector, labels)]

        covered: set[str] = set()
        for kind, field in (
            ("Service", None),
            ("PodDisruptionBudget", "selector"),
            ("NetworkPolicy", "podSelector"),
        ):
            for (namespace, _), obj in self.by_kind.get(kind, {}).items():
                raw = obj["spec"].get("selector", {}) if field is None else obj["spec"].get(field, {})
                selector = {"matchLabels": raw} if field is None else raw
                if not selector.get("matchLabels") and not selector.get("matchExpressions"):
                    continue  # an empty NetworkPolicy selector means every pod
                hits = selected(namespace, selector)
                if not hits:
                    self.problem(obj, "selects no pod")
                if kind == "PodDisruptionBudget":
                    covered.update(describe(o) for o in hits)
        for obj in workloads:
            if obj["spec"].get("replicas", 2) > 1 and describe(obj) not in covered:
                self.problem(obj, "no PodDisruptionBudget covers it")


def parse_kvgate_args(args: list[str], env: dict[str, str] | None = None) -> argparse.Namespace | str:
    """The args parsed by the real `kvgate` CLI in the container's environment (its defaults read
    KVGATE_REDIS_URL and friends), or the parser's complaint."""
    for path in (REPO, REPO / "protos"):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    from kvgate.cli import build_parser

    stderr = io.StringIO()
    try:
        with mock.patch.dict(os.environ, env or {}, clear=True), contextlib.redirect_stderr(stderr):
            return build_parser().parse_args(args)
    except SystemExit:
        # argparse's last line: "kvgate <command>: error: <what>"
        return stderr.getvalue().strip().splitlines()[-1].split("error: ", 1)[-1]


def check_mqtt_url(url: str) -> str:
    from kvgate.mqtt_url import MqttUrl

    try:
        parsed = MqttUrl.parse(url)
    except ValueError as exc:
        return str(exc)
    return (
        "" if parsed.username and parsed.password else "no user name and password (the broker requires them)"
    )


def check_redis_url(url: str) -> str:
    from redis.connection import parse_url

    try:
        parsed = parse_url(url)
    except ValueError as exc:
        return str(exc)
    return "" if parsed.get("password") else "no password (Redis requires one)"


def lint_problems(objects: list[Obj]) -> list[str]:
    return Lint(objects).run()


def check(directory: Path) -> list[str]:
    """Every problem of one kustomization: rendering, schema, lint."""
    try:
        objects = render(directory)
    except ValueError as exc:
        return [str(exc)]
    return schema_problems(objects) + lint_problems(objects)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "dirs", nargs="*", type=Path, help="kustomization directories (default: every overlay)"
    )
    args = parser.parse_args(argv)
    failed = False
    try:
        for directory in args.dirs or overlays():
            problems = check(directory)
            failed |= bool(problems)
            status = "ok" if not problems else f"{len(problems)} problem(s)"
            print(f"{directory}: {status}")
            for problem in problems:
                print(f"  {problem}")
    except ToolMissing as exc:
        print(f"validate.py: {exc}", file=sys.stderr)
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
