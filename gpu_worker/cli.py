"""`kvgate worker`: run one GPU worker."""

from __future__ import annotations

import argparse
import os
import sys

from gpu_worker.engine import EngineError
from gpu_worker.server import WorkerService, WorkerSettings
from kvgate.service import run_event_loop, run_until_signalled


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--worker-id", required=True, help="unique id of this worker in the fleet")
    parser.add_argument("--region", required=True, help="region label (failure domain, reporting)")
    parser.add_argument(
        "--engine",
        choices=("sim", "vllm"),
        default="sim",
        help="sim: CPU model of a vLLM engine; vllm: real vLLM on a GPU (default: sim)",
    )
    parser.add_argument(
        "--listen", default="0.0.0.0:50061", help="gRPC listen address (default: %(default)s)"
    )
    parser.add_argument(
        "--advertise",
        default="",
        help="address gateways use to reach this worker (default: the listen address)",
    )
    parser.add_argument(
        "--gpu", default="h100", help="sim GPU profile: h100, h200, a100 (default: %(default)s)"
    )
    parser.add_argument(
        "--model",
        default="llama-3-8b",
        help="model name; for sim a profile: llama-3-8b, llama-3-70b, mixtral-8x7b",
    )
    parser.add_argument(
        "--model-path", default="", help="vllm: model path or Hugging Face id (default: --model)"
    )
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default: %(default)s)")
    parser.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="fraction of GPU memory for weights + KV cache (default: %(default)s)",
    )
    parser.add_argument(
        "--num-gpu-blocks",
        type=int,
        # A string default goes through type=int, so a bad value is an argparse error.
        default=os.environ.get("KVGATE_NUM_GPU_BLOCKS") or None,
        help="override the KV block count, e.g. a small fleet for shedding tests "
        "(default: $KVGATE_NUM_GPU_BLOCKS or what fits in GPU memory)",
    )
    parser.add_argument(
        "--max-num-seqs", type=int, default=256, help="max running sequences (default: %(default)s)"
    )
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=8192,
        help="token budget per engine step (default: %(default)s)",
    )
    parser.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="sim: wall seconds per modelled second; >1 slows the sim down (default: %(default)s)",
    )
    parser.add_argument(
        "--merge-chunks",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="sim: when a request's stream is behind, send the steps it missed as one message, "
        "as vLLM does; --no-merge-chunks sends one message per step, the naive baseline of "
        "`kvgate bench relay` (default: merge)",
    )
    parser.add_argument(
        "--mqtt-url",
        default=os.environ.get("KVGATE_MQTT_URL", "mqtt://localhost:1883"),
        help="broker for telemetry, mqtt://[user:password@]host[:port]; the user name must be "
        "the worker id when the broker enforces per-worker ACLs "
        "(default: $KVGATE_MQTT_URL or mqtt://localhost:1883)",
    )
    parser.add_argument(
        "--stats-interval",
        type=float,
        default=0.25,
        help="seconds between stats messages (default: %(default)s)",
    )
    parser.add_argument(
        "--mqtt-keepalive",
        type=int,
        default=5,
        help="MQTT keepalive seconds; the broker declares us offline after 1.5x (default: %(default)s)",
    )
    parser.add_argument(
        "--drain-grace",
        type=float,
        default=60.0,
        help="seconds in-flight requests get to finish on SIGTERM (default: %(default)s)",
    )
    parser.add_argument(
        "--prefill-tokens-per-s",
        type=float,
        default=None,
        help="prompt tokens/s this worker prefills, reported to the scheduler "
        "(default: roofline estimate for sim, 10000 for vllm)",
    )
    parser.add_argument("--metrics-port", type=int, default=None, help="Prometheus port (default: off)")


def run(args: argparse.Namespace) -> int:
    settings = WorkerSettings(
        worker_id=args.worker_id,
        region=args.region,
        listen=args.listen,
        advertise=args.advertise,
        engine=args.engine,
        gpu=args.gpu,
        model=args.model,
        vllm_model_path=args.model_path,
        tp=args.tp,
        gpu_memory_utilization=args.gpu_memory_utilization,
        num_gpu_blocks=args.num_gpu_blocks,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        time_scale=args.time_scale,
        merge_chunks=args.merge_chunks,
        mqtt_url=args.mqtt_url,
        stats_interval_s=args.stats_interval,
        mqtt_keepalive_s=args.mqtt_keepalive,
        drain_grace_s=args.drain_grace,
        metrics_port=args.metrics_port,
        prefill_tokens_per_s=args.prefill_tokens_per_s,
    )

    async def main() -> None:
        service = WorkerService(settings)
        await run_until_signalled(f"worker {settings.worker_id}", service.start, service.stop)

    try:
        run_event_loop(main())  # MQTT runs on its own thread and loop (telemetry.py)
    except (EngineError, ValueError) as exc:
        print(f"kvgate worker: {exc}", file=sys.stderr)
        return 2
    return 0
