"""The `kvgate` command: one entry point, a subcommand per process or tool."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from types import ModuleType

from kvgate import __version__

# name -> (module with add_arguments/run, one-line help). vLLM is imported only when
# `kvgate worker --engine vllm` runs, so every other command works without it.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "gateway": ("gateway.cli", "run the public Chat API gateway"),
    "scheduler": ("scheduler.cli", "run a scheduler replica (placement, pins, telemetry ingest)"),
    "worker": ("gpu_worker.cli", "run one GPU worker (simulated or vLLM engine)"),
    "status": ("scheduler.status_cli", "live view of the fleet: KV use, batch, pins, shedding (or --json)"),
    "drain": (
        "scheduler.drain_cli",
        "drain a worker through the scheduler: no new sessions, in-flight ones finish",
    ),
    "chat": ("gateway.chat_cli", "chat with the fleet through a gateway"),
    "keys": ("gateway.keys_cli", "manage the gateway's API keys (create, list, revoke, quarantine)"),
    "engine-profile": ("gpu_worker.engine_profile_cli", "KV capacity and roofline step times of a GPU/model"),
    "bench": ("kvgate.bench_cli", "benchmarks (engine, ...)"),
    "health": ("kvgate.health_cli", "check a kvgate service's gRPC health (exit 0 when SERVING)"),
    "sim": ("scheduler.fleetsim.cli", "simulate a fleet on a trace: compare placement policies (or --json)"),
}


def _module(path: str) -> ModuleType:
    import importlib

    return importlib.import_module(path)


def build_parser(
    load: Callable[[str], ModuleType] = _module, only: str | None = None
) -> argparse.ArgumentParser:
    """The full parser, or with `only` one whose other subcommands are listed but not loaded:
    importing every command's module costs seconds on a busy machine, and container
    healthchecks run `kvgate health` every few seconds."""
    parser = argparse.ArgumentParser(
        prog="kvgate",
        description="kvgate: KV-cache-aware global scheduling of LLM chat on GPU fleets.",
    )
    parser.add_argument("--version", action="version", version=f"kvgate {__version__}")
    parser.add_argument(
        "--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default: %(default)s)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_path, help_text) in SUBCOMMANDS.items():
        child = sub.add_parser(name, help=help_text, description=help_text)
        if only is not None and name != only:
            continue
        module = load(module_path)
        module.add_arguments(child)
        if hasattr(module, "run"):  # a command group (bench) lets its subcommands set run
            child.set_defaults(run=module.run)
    return parser


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((arg for arg in argv if arg in SUBCOMMANDS), None)
    args = build_parser(only=command).parse_args(argv)
    configure_logging(args.log_level)
    result: int = args.run(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
