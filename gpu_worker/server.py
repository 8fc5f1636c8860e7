"""Wiring of one worker process: engine + gRPC Worker service + MQTT telemetry."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from gpu_worker.engine import Engine, EngineError
from gpu_worker.servicer import WorkerServicer
from gpu_worker.telemetry import DRAINING, TelemetryPublisher, WorkerIdentity
from kvgate.mqtt_url import MqttUrl
from kvgate.service import BackgroundTasks, GrpcHost, start_metrics_server
from kvgate.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

WORKER_SERVICE = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name


@dataclass(frozen=True)
class WorkerSettings:
    worker_id: str
    region: str
    listen: str = "0.0.0.0:50061"
    advertise: str = ""
    engine: str = "sim"
    gpu: str = "h100"
    model: str = "llama-3-8b"
    tp: int = 1
    mqtt_url: str = "mqtt://localhost:1883"
    stats_interval_s: float = 0.25
    mqtt_keepalive_s: int = 5
    time_scale: float = 1.0
    merge_chunks: bool = True
    num_gpu_blocks: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    gpu_memory_utilization: float = 0.9
    metrics_port: int | None = None
    drain_grace_s: float = 60.0
    vllm_model_path: str = ""
    # None: the sim engine's roofline estimate; vLLM workers default to VLLM_PREFILL_TOKENS_PER_S.
    prefill_tokens_per_s: float | None = None


# A conservative prefill rate for an 8B-class model on one modern GPU when none is configured:
# it only weighs "wait for the pinned worker" against "recompute elsewhere".
VLLM_PREFILL_TOKENS_PER_S = 10_000.0


def prefill_tokens_per_s(settings: WorkerSettings) -> float:
    if settings.prefill_tokens_per_s is not None:
        return settings.prefill_tokens_per_s
    if settings.engine != "sim":
        return VLLM_PREFILL_TOKENS_PER_S
    from gpu_worker.sim.profiles import get_gpu, get_model
    from gpu_worker.sim.roofline import step_cost

    tokens = 2048  # a typical conversation history to recompute
    cost = step_cost(get_gpu(settings.gpu), get_model(settings.model), settings.tp, 0, 0, tokens, 0)
    return tokens / cost.seconds


def build_engine(settings: WorkerSettings) -> Engine:
    if settings.engine == "sim":
        from gpu_worker.live_sim import LiveSimEngine
        from gpu_worker.sim import EngineConfig

        try:
            config = EngineConfig(
                gpu=settings.gpu,
                model=settings.model,
                tp=settings.tp,
                gpu_memory_utilization=settings.gpu_memory_utilization,
                max_num_seqs=settings.max_num_seqs,
                max_num_batched_tokens=settings.max_num_batched_tokens,
                num_gpu_blocks_override=settings.num_gpu_blocks,
            )
            return LiveSimEngine(config, time_scale=settings.time_scale, merge_chunks=settings.merge_chunks)
        except ValueError as exc:
            raise EngineError(str(exc)) from exc
    if settings.engine == "vllm":
        from gpu_worker.vllm_engine import VllmEngine, VllmEngineConfig

        return VllmEngine(
            VllmEngineConfig(
                model=settings.vllm_model_path or settings.model,
                tensor_parallel_size=settings.tp,
                gpu_memory_utilization=settings.gpu_memory_utilization,
                max_num_seqs=settings.max_num_seqs,
                max_num_batched_tokens=settings.max_num_batched_tokens,
            )
        )
    raise EngineError(f"--engine must be 'sim' or 'vllm', got {settings.engine!r}")


class WorkerService:
    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.engine = build_engine(settings)
        self.host = GrpcHost(settings.listen, [WORKER_SERVICE])
        self.servicer = WorkerServicer(self.engine, on_drain=self._announce_drain)
        worker_pb2_grpc.add_WorkerServicer_to_server(self.servicer, self.host.server)
        self.telemetry: TelemetryPublisher | None = None
        self._tasks = BackgroundTasks()

    @property
    def address(self) -> str:
        return self.settings.advertise or self.host.address

    def _announce_drain(self) -> None:
        if self.telemetry is not None:
            self.telemetry.set_state(DRAINING)
        # Health NOT_SERVING too, so orchestrators (readiness probes) see the drain as well.
        self._tasks.spawn("drain-health", self.host.set_serving(False))

    async def start(self) -> None:
        await self.engine.start()
        await self.host.start()
        start_metrics_server(self.settings.metrics_port)
        identity = WorkerIdentity(
            worker_id=self.settings.worker_id,
            region=self.settings.region,
            address=self.address,
            model=self.engine.model,
            engine=self.engine.kind,
            gpu=self.settings.gpu if self.engine.kind == "sim" else "cuda",
            prefill_tokens_per_s=prefill_tokens_per_s(self.settings),
            max_num_seqs=self.settings.max_num_seqs,
        )
        self.telemetry = TelemetryPublisher(
            MqttUrl.parse(self.settings.mqtt_url),
            identity,
            self.engine,
            interval_s=self.settings.stats_interval_s,
            keepalive_s=self.settings.mqtt_keepalive_s,
        )
        self.telemetry.start()
        log.info(
            "worker %s (%s, %s on %s, %d KV blocks of %d tokens) serving on %s",
            self.settings.worker_id,
            self.settings.region,
            self.engine.model,
            identity.gpu,
            self.engine.num_blocks,
            self.engine.block_size,
            self.address,
        )

    async def stop(self) -> None:
        """Drain: announce, refuse new requests, let in-flight ones finish, then go offline."""
        self.servicer.start_drain()
        if not await self.servicer.wait_idle(self.settings.drain_grace_s):
            log.warning("drain grace expired with %d requests in flight", self.servicer.in_flight)
        if self.telemetry is not None:
            # The publisher says OFFLINE itself before the connection closes.
            await self.telemetry.stop()
        await self._tasks.join(timeout_s=5.0)
        await self.host.stop(grace_s=1.0)
        await self.engine.close()
