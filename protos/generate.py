"""Regenerate the Python code for protos/kvgate/v1/*.proto.

Writes *_pb2.py, *_pb2_grpc.py and typed stubs (*.pyi, via mypy-protobuf) beside
the .proto files, or into --out for the staleness check in tests/unit.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PACKAGE_DIR = PROTO_ROOT / "kvgate" / "v1"


def proto_files() -> list[Path]:
    return sorted(PACKAGE_DIR.glob("*.proto"))


def generate(out: Path) -> None:
    (out / "kvgate" / "v1").mkdir(parents=True, exist_ok=True)
    # The mypy-protobuf plugins (protoc-gen-mypy*) live beside this interpreter.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    args = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *[str(p.relative_to(PROTO_ROOT)) for p in proto_files()],
    ]
    subprocess.run(args, check=True, cwd=PROTO_ROOT, env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=PROTO_ROOT, help="output root (default: protos/)")
    generate(parser.parse_args().out)


if __name__ == "__main__":
    main()
