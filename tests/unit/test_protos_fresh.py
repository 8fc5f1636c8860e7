"""The committed generated code must match what `make protos` produces from the .proto files."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GENERATED = REPO / "protos" / "kvgate" / "v1"


def test_generated_protobuf_code_is_fresh(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(REPO / "protos" / "generate.py"), "--out", str(tmp_path)], check=True)
    fresh = tmp_path / "kvgate" / "v1"
    names = sorted(p.name for p in fresh.iterdir() if p.suffix in (".py", ".pyi"))
    assert names, "generator produced nothing"
    stale = [
        n
        for n in names
        if not (GENERATED / n).exists() or not filecmp.cmp(fresh / n, GENERATED / n, shallow=False)
    ]
    committed = sorted(
        p.name for p in GENERATED.iterdir() if p.name.endswith(("_pb2.py", "_pb2_grpc.py", ".pyi"))
    )
    extra = sorted(set(committed) - set(names))
    assert not stale and not extra, (
        f"generated code is stale (run `make protos`): differs {stale}, orphaned {extra}"
    )


def test_generated_package_imports_as_kvgate_v1() -> None:
    from kvgate.v1 import chat_pb2, scheduler_pb2, telemetry_pb2, worker_pb2

    assert chat_pb2.DESCRIPTOR.package == "kvgate.v1"
    assert {"Chat"} <= set(chat_pb2.DESCRIPTOR.services_by_name)
    assert {"Worker"} <= set(worker_pb2.DESCRIPTOR.services_by_name)
    assert {"Scheduler"} <= set(scheduler_pb2.DESCRIPTOR.services_by_name)
    assert telemetry_pb2.WorkerStats().DESCRIPTOR.full_name == "kvgate.v1.WorkerStats"
