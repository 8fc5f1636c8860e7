"""Run one assistant turn across the fleet: place, stream from the worker, fail over.

If a worker fails before its first token the turn is placed again invisibly; if it
fails after some tokens, the turn resumes on another worker from the history plus the
partial answer, so the client sees one uninterrupted stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import grpc

from gateway import prompt
from gateway.admission import AdmissionPolicy, AdmissionQueue
from gateway.coalesce import coalesced
from gateway.metrics import FAILOVERS
from kvgate.service import WORKER_CHANNEL_OPTIONS
from kvgate.v1 import chat_pb2, common_pb2, scheduler_pb2, worker_pb2, worker_pb2_grpc

if TYPE_CHECKING:
    from kvgate.v1.scheduler_pb2_grpc import SchedulerAsyncStub
    from kvgate.v1.worker_pb2_grpc import WorkerAsyncStub

log = logging.getLogger(__name__)

RETRYABLE_WORKER_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
     grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED}
)  # fmt: skip


# A few ms of coalescing is invisible to a reader (tokens arrive every ~10-50 ms per stream)
# but turns a burst of per-step messages into one.
DEFAULT_COALESCE_MS = 15.0
DEFAULT_COALESCE_CHARS = 512


class AtCapacity(Exception):
    def __init__(self, retry_after_ms: int, reason: str) -> None:
        super().__init__(reason)
        self.retry_after_ms = retry_after_ms


# Pauses before the 2nd, 3rd and 4th Place attempt when a scheduler replica is unavailable.
PLACE_RETRY_DELAYS_S = (0.05, 0.2, 0.5)


class PlacementUnavailable(Exception):
    def __init__(self, detail: str, retry_after_ms: int = 1000) -> None:
        super().__init__(detail)
        self.retry_after_ms = retry_after_ms


class TurnRejected(Exception):
    """The worker refused the request as invalid (e.g. prompt longer than the context)."""


@dataclass(frozen=True)
class TurnJob:
    session_id: str
    model: str
    tier: str
    messages: Sequence[common_pb2.Message]
    prompt_tokens_estimate: int
    max_tokens: int
    deadline: float | None = None  # time.monotonic() by which the turn must end
    # A stored session's first turn: nothing pinned yet (the scheduler may reserve sooner).
    first_turn: bool = False
    # The worker of a stored session's previous turn: the scheduler may reserve on it sooner.
    last_worker: str = ""


@dataclass
class TurnProgress:
    parts: list[str] = field(default_factory=list)
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    started_at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    worker_id: str = ""
    region: str = ""
    finish_reason: str = ""
    resumed: bool = False

    @property
    def text(self) -> str:
        return "".join(self.parts)


# Workers come back at new addresses (a restarted pod gets a new IP): a channel no call has used
# for this long is closed, or a long-running gateway would keep one per address it ever used.
IDLE_CHANNEL_CLOSE_S = 600.0


@dataclass
class _Channel:
    channel: grpc.aio.Channel
    last_used: float
    calls: int = 0  # in flight: a channel is never closed under a call


class WorkerChannels:
    """One long-lived channel per worker address (HTTP/2 multiplexes all streams over it)."""

    def __init__(
        self, idle_close_s: float = IDLE_CHANNEL_CLOSE_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._channels: dict[str, _Channel] = {}
        self._idle_close_s = idle_close_s
        self._clock = clock
        self._last_sweep = clock()
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def addresses(self) -> list[str]:
        return list(self._channels)

    def stub(self, address: str) -> WorkerAsyncStub:
        """A stub for one call to `address`; end it with `done(address)`. Closes channels idle past
        the idle limit, at most every tenth of it."""
        now = self._clock()
        entry = self._channels.get(address)
        if entry is None:
            channel = grpc.aio.insecure_channel(address, options=WORKER_CHANNEL_OPTIONS)
            entry = self._channels[address] = _Channel(channel, now)
        entry.calls += 1
        entry.last_used = now
        if now - self._last_sweep >= self._idle_close_s / 10:
            self._last_sweep = now
            self._close_idle(now)
        return worker_pb2_grpc.WorkerStub(entry.channel)

    def done(self, address: str) -> None:
        entry = self._channels.get(address)
        if entry is not None:
            entry.calls -= 1
            entry.last_used = self._clock()

    def _close_idle(self, now: float) -> None:
        for address, entry in list(self._channels.items()):
            if entry.calls <= 0 and now - entry.last_used > self._idle_close_s:
                del self._channels[address]
                task = asyncio.create_task(entry.channel.close())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        for entry in self._channels.values():
            await entry.channel.close()
        self._channels.clear()
        await asyncio.gather(*self._closing)


class Runner(Protocol):
    """Streams one assistant turn: the fleet's TurnRunner, or a stand-in of the same shape (the
    quarantine Meower, wrappers that watch or refund a runner's turns)."""

    def stream(self, job: TurnJob, progress: TurnProgress) -> AsyncGenerator[chat_pb2.SendEvent, None]: ...


class TurnRunner:
    def __init__(
        self,
        scheduler: SchedulerAsyncStub,
        workers: WorkerChannels,
        max_attempts: int = 4,
        coalesce_ms: float = DEFAULT_COALESCE_MS,
        coalesce_chars: int = DEFAULT_COALESCE_CHARS,
        admission: AdmissionPolicy | None = None,
    ) -> None:
        self._scheduler = scheduler
        self._workers = workers
        self._max_attempts = max_attempts
        self._coalesce_s = coalesce_ms / 1000
        self._coalesce_chars = coalesce_chars
        self._admission = AdmissionQueue(admission or AdmissionPolicy())
        self._background: set[asyncio.Task[None]] = set()

    async def stream(self, job: TurnJob, progress: TurnProgress) -> AsyncGenerator[chat_pb2.SendEvent, None]:
        excluded: list[str] = []
        block_hashes = await _prompt_block_hashes(job.messages)
        for _attempt in range(self._max_attempts):
            request_id = uuid.uuid4().hex
            placed = await self._place(job, request_id, progress, excluded, block_hashes)
            call = self._workers.stub(placed.address).Generate(
                worker_pb2.GenerateRequest(
                    request_id=request_id,
                    session_id=job.session_id,
                    messages=job.messages,
                    max_tokens=job.max_tokens - progress.completion_tokens,
                    assistant_prefix=progress.text,
                    # Sampling seed per attempt: sim workers derive their synthetic text from it.
                    seed=int(request_id[:15], 16),
                ),
                timeout=_remaining(job.deadline),
            )
            try:
                # Announced while the worker starts on the prompt rather than with its first
                # token, so writing it costs the time to first token nothing; a turn that fails
                # over announces its new worker the same way.
                yield chat_pb2.SendEvent(
                    placement=chat_pb2.Placement(
                        worker_id=placed.worker_id,
                        region=placed.region,
                        cache_hit=placed.outcome == scheduler_pb2.PLACE_OUTCOME_PINNED_HIT,
                        engine=placed.engine,
                    )
                )
                async with contextlib.aclosing(
                    coalesced(call, self._coalesce_s, self._coalesce_chars)
                ) as batches:
                    async for batch in batches:
                        if not progress.prompt_tokens:
                            progress.prompt_tokens = batch[0].prompt_tokens
                            progress.cached_tokens = batch[0].cached_tokens
                        text = "".join(chunk.text for chunk in batch)
                        if text:
                            if progress.first_token_at is None:
                                progress.first_token_at = time.monotonic()
                            progress.parts.append(text)
                            yield chat_pb2.SendEvent(delta=chat_pb2.TextDelta(text=text))
                        progress.completion_tokens += sum(chunk.num_tokens for chunk in batch)
                        if batch[-1].finished:
                            progress.finish_reason = batch[-1].finish_reason or "stop"
                            return
                # The stream closed without a final chunk: the worker went away.
                log.warning("worker %s ended the stream early", placed.worker_id)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise TurnRejected(exc.details() or "invalid request") from exc
                if exc.code() not in RETRYABLE_WORKER_CODES:
                    raise
                log.warning(
                    "worker %s failed (%s: %s); failing over",
                    placed.worker_id,
                    exc.code().name,
                    exc.details(),
                )
            finally:
                call.cancel()
                self._workers.done(placed.address)
                self._release(request_id, placed.worker_id)
            excluded.append(placed.worker_id)
            progress.resumed = progress.resumed or progress.completion_tokens > 0
            FAILOVERS.labels(after_first_token=str(progress.completion_tokens > 0).lower()).inc()
        raise PlacementUnavailable(f"no worker could finish the turn after {self._max_attempts} attempts")

    async def _place(
        self,
        job: TurnJob,
        request_id: str,
        progress: TurnProgress,
        excluded: list[str],
        block_hashes: list[int],
    ) -> scheduler_pb2.Placed:
        request = scheduler_pb2.PlaceRequest(
            request_id=request_id,
            session_id=job.session_id,
            model=job.model,
            tier=job.tier,
            prompt_tokens=job.prompt_tokens_estimate + progress.completion_tokens,
            max_new_tokens=job.max_tokens - progress.completion_tokens,
            exclude_workers=excluded,
            block_hashes=block_hashes,
            first_turn=job.first_turn and not excluded,
            last_worker=job.last_worker,
        )
        response = await self._place_once(request, job.deadline)
        if _may_wait(response) and self._admission.enter():
            # Bounded admission wait: ask again while capacity may free up (see gateway/admission.py).
            waiting_since = time.monotonic()
            outcome = "cancelled"  # the client went away (or the deadline passed) while waiting
            try:
                while _may_wait(response):
                    pause_s = self._admission.next_poll_s(
                        response.shed.retry_after_ms,
                        time.monotonic() - waiting_since,
                        None if job.deadline is None else job.deadline - time.monotonic(),
                    )
                    if pause_s <= 0:
                        break
                    await asyncio.sleep(pause_s)
                    response = await self._place_once(request, job.deadline)
                outcome = "placed" if response.WhichOneof("result") == "placed" else "shed"
            finally:
                self._admission.leave(outcome)
        if response.WhichOneof("result") == "shed":
            raise _refusal(response.shed, request, job)
        progress.worker_id = response.placed.worker_id
        progress.region = response.placed.region
        placed: scheduler_pb2.Placed = response.placed
        return placed

    async def _place_once(
        self, request: scheduler_pb2.PlaceRequest, deadline: float | None
    ) -> scheduler_pb2.PlaceResponse:
        """One placement, retried on another scheduler replica while one is unavailable."""
        for delay_s in (*PLACE_RETRY_DELAYS_S, None):
            try:
                response: scheduler_pb2.PlaceResponse = await self._scheduler.Place(
                    request, timeout=min(5.0, _remaining(deadline) or 5.0)
                )
                return response
            except grpc.aio.AioRpcError as exc:
                # A scheduler replica that died or restarts answers UNAVAILABLE; the channel
                # round-robins, so the retry goes to another replica. Reservations are keyed by
                # request id: a retry that picks the same worker replaces its own; one that picks
                # another leaves the first to expire with its ttl (the reply may have been lost
                # after the commit), never a double booking of one worker.
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and _expired(deadline):
                    raise  # the client's own deadline ran out, not the scheduler: say so
                if exc.code() != grpc.StatusCode.UNAVAILABLE or delay_s is None:
                    raise PlacementUnavailable(
                        f"scheduler unavailable ({exc.code().name}: {exc.details()})", _pushback_ms(exc)
                    ) from exc
                log.warning("scheduler unavailable (%s); retrying placement", exc.details())
                await asyncio.sleep(delay_s)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _release(self, request_id: str, worker_id: str) -> None:
        async def release() -> None:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self._scheduler.Release(
                    scheduler_pb2.ReleaseRequest(request_id=request_id, worker_id=worker_id), timeout=2.0
                )

        task = asyncio.create_task(release())
        self._background.add(task)
        task.add_done_callback(self._background.discard)


# Hashing a conversation takes ~60 ms per MiB of text. Past this size it runs in a thread, so the
# event loop goes on relaying every other stream meanwhile instead of stalling them all for the
# whole hash: the GIL changes hands between the hash's steps (for a 1 MiB conversation the
# loop's longest pause was 27 ms instead of 58-75 ms; the tokenizer's regex is one C call).
HASH_IN_THREAD_CHARS = 64 * 1024


async def _prompt_block_hashes(messages: Sequence[common_pb2.Message]) -> list[int]:
    if sum(len(m.content) for m in messages) < HASH_IN_THREAD_CHARS:
        return prompt.prompt_block_hashes(messages)
    return await asyncio.to_thread(prompt.prompt_block_hashes, messages)


def _may_wait(response: scheduler_pb2.PlaceResponse) -> bool:
    """A shed the fleet may lift within an admission wait: not a request too large for any worker."""
    return response.WhichOneof("result") == "shed" and response.shed.code != scheduler_pb2.SHED_CODE_TOO_LARGE


def _refusal(shed: scheduler_pb2.Shed, request: scheduler_pb2.PlaceRequest, job: TurnJob) -> Exception:
    """What the client is told: the fleet is full (retry), the model has no live worker (retry
    later: UNAVAILABLE), or the request can never fit (INVALID_ARGUMENT, naming both numbers)."""
    if shed.code == scheduler_pb2.SHED_CODE_TOO_LARGE:
        return TurnRejected(
            f"max_tokens too large for this conversation: its prompt (~{request.prompt_tokens} tokens) "
            f"plus max_tokens ({request.max_new_tokens}) need {shed.tokens_needed} KV tokens, more than "
            f"the {shed.tokens_limit} a worker serving {job.model} can hold for the {job.tier} tier; "
            "shorten the conversation or lower max_tokens"
        )
    if shed.code == scheduler_pb2.SHED_CODE_NO_WORKER:
        return PlacementUnavailable(
            f"{shed.reason}; retry after the pushback delay", shed.retry_after_ms or 1000
        )
    return AtCapacity(shed.retry_after_ms, shed.reason)


def _expired(deadline: float | None) -> bool:
    # A Place given the turn's remaining time fails a hair before the deadline itself.
    return deadline is not None and deadline - time.monotonic() <= 0.01


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    return max(0.001, deadline - time.monotonic())


def _pushback_ms(exc: grpc.aio.AioRpcError) -> int:
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-retry-pushback-ms" and isinstance(value, str) and value.isdigit():
            return int(value)
    return 1000
