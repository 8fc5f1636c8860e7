"""`kvgate bench load`: an open-loop load generator against a running gateway.

It replays a trace's arrivals and lengths (scheduler.fleetsim.trace: Azure, Mooncake,
synthetic chat) at a chosen rate, over gRPC or, with `--http`, the OpenAI-compatible API, and
reports TTFT/ITL/E2E percentiles, throughput, shed and error counts, per region and worker.

Open loop: every request goes out at its (scaled) arrival time whether or not earlier ones
have finished, so an overloaded fleet shows up as latency and shedding, not as a politely
slower client. Two things can still hold a request back, and both are reported, never hidden:
the previous turn of its conversation (a user answers what they read: turns of one
conversation go out in order on one gateway session), and `--max-in-flight` (the client's own
limit: such a request is "late", or "dropped" with `--on-full drop`).

Prompts are built to the trace's lengths with the sim tokenizer's vocabulary: token id i of the
trace is one fixed word, so requests that share token ranges in the trace (Mooncake hash ids, a
synthetic system prompt) share text, and with it KV blocks on sim workers. A later turn sends
only what the trace adds after the previous prompt and answer; the gateway session (gRPC) or
the resent conversation (HTTP) holds the rest.

Python callers use `run_load(LoadConfig(...))` and get every RequestRecord back, e.g. to
inject faults during the run and then check each acknowledged turn against the stored history;
the command line is gateway/loadgen_cli.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from gateway.loadgen_clients import (
    Conversation,
    GrpcTurns,
    HttpTurns,
    TurnClient,
    TurnResult,
    sleep_before_retry,
)
from gateway.loadgen_report import DROPPED, OK, SHED, LoadReport, RequestRecord
from gpu_worker.sim.tokenizer import SimTokenizer
from scheduler.fleetsim.trace import (
    RANGE,
    SyntheticSpec,
    Trace,
    TraceRequest,
    load_trace,
    scaled_requests,
)

# Seed of the word behind each trace token id (any fixed number: the same id is the same word
# in every run and every process, which is what makes shared prefixes shared).
PROMPT_WORD_SEED = 0x6B76_6761_7465
# Below this many tokens a "new" message would be a single word or mark; a follow-up whose trace
# prompt adds less than the previous answer (Mooncake) still says something.
MIN_MESSAGE_TOKENS = 4
_TOKENIZER = SimTokenizer()

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadConfig:
    """What to replay, where, and how hard. Field names follow the CLI options."""

    trace: str | Trace = "synthetic"
    gateway: str = "localhost:50050"
    http: str = ""  # an OpenAI API base URL (http://host:8080/v1): use it instead of gRPC
    api_key: str = ""
    tls_ca: str | None = None
    model: str = ""  # "" = the gateway's default
    rate_scale: float = 1.0
    rate: float | None = None  # requests/s over the replayed part; overrides the trace's rate
    duration_s: float | None = None  # trace seconds replayed
    requests: int | None = None
    max_tokens: int = 1024
    max_prompt_tokens: int = 4096
    max_in_flight: int = 512
    on_full: Literal["wait", "drop"] = "wait"
    retries: int = 3
    retry_shed: bool = False
    timeout_s: float = 300.0
    seed: int = 0
    text_check: bool = True
    synthetic: SyntheticSpec | None = None

    def validate(self) -> None:
        """Raise ValueError naming the option when a value cannot work."""
        checks: list[tuple[bool, str]] = [
            (
                0 < self.rate_scale < math.inf,
                f"--rate-scale must be a positive number, got {self.rate_scale}",
            ),
            (
                self.rate is None or 0 < self.rate < math.inf,
                f"--rate must be a positive number, got {self.rate}",
            ),
            (self.rate is None or self.rate_scale == 1.0, "--rate and --rate-scale are exclusive: pick one"),
            (
                self.duration_s is None or self.duration_s > 0,
                f"--duration must be > 0, got {self.duration_s}",
            ),
            (self.requests is None or self.requests >= 1, f"--requests must be >= 1, got {self.requests}"),
            (self.max_tokens >= 1, f"--max-tokens must be >= 1, got {self.max_tokens}"),
            (
                self.max_prompt_tokens >= MIN_MESSAGE_TOKENS,
                f"--max-prompt-tokens must be >= {MIN_MESSAGE_TOKENS}, got {self.max_prompt_tokens}",
            ),
            (self.max_in_flight >= 1, f"--max-in-flight must be >= 1, got {self.max_in_flight}"),
            (self.on_full in ("wait", "drop"), f"--on-full must be wait or drop, got {self.on_full!r}"),
            (self.retries >= 0, f"--retries must be >= 0, got {self.retries}"),
            (self.timeout_s > 0, f"--timeout must be > 0, got {self.timeout_s}"),
            (
                not self.http or self.http.startswith(("http://", "https://")),
                f"--http must be a base URL like http://host:8080/v1, got {self.http!r}",
            ),
            (
                bool(self.http) or _is_host_port(self.gateway),
                f"--gateway must be HOST:PORT, got {self.gateway!r}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def _is_host_port(address: str) -> bool:
    host, sep, port = address.rpartition(":")
    return bool(sep and host and port.isdigit())


# -- the schedule (pure) ----------------------------------------------------------------------


@dataclass(frozen=True)
class Planned:
    at_s: float  # offset from the start of the run
    request: TraceRequest


def plan(
    trace: Trace,
    rate_scale: float = 1.0,
    rate: float | None = None,
    duration_s: float | None = None,
    requests: int | None = None,
    seed: int = 0,
) -> list[Planned]:
    """The requests to send and when, first at 0.

    `rate_scale` K overlays/thins the trace exactly as `kvgate sim` does (scaled_requests).
    `rate` R instead stretches or squeezes time so the replayed requests (after `duration_s`
    and `requests`) arrive at R per second on average, keeping the trace's burst shape.
    `duration_s` counts trace seconds from the first request (before any stretching).
    """
    chosen: list[TraceRequest] = []
    # Seconds from the first request, not the trace's clock (a synthetic trace starts later).
    for r in scaled_requests(trace, 1.0 if rate is not None else rate_scale, seed):
        if requests is not None and len(chosen) >= requests:
            break
        if duration_s is not None and chosen and r.arrival_s - chosen[0].arrival_s > duration_s:
            break
        chosen.append(r)
    if not chosen:
        return []
    t0 = chosen[0].arrival_s
    span = chosen[-1].arrival_s - t0
    if rate is None:
        return [Planned(r.arrival_s - t0, r) for r in chosen]
    if span <= 0:  # one instant in the trace: spread evenly at the rate asked for
        return [Planned(i / rate, r) for i, r in enumerate(chosen)]
    stretch = (len(chosen) - 1) / span / rate
    return [Planned((r.arrival_s - t0) * stretch, r) for r in chosen]


@dataclass(frozen=True)
class Message:
    text: str
    tokens: int
    capped: bool


def next_message(request: TraceRequest, conv: Conversation, max_prompt_tokens: int) -> Message:
    """The user message for this turn: the trace prompt's positions after what the conversation
    already holds (all of them on a first turn), at most what keeps the conversation within
    `max_prompt_tokens`, at least MIN_MESSAGE_TOKENS (the tail of the prompt when the trace adds
    less than that)."""
    wanted = request.prompt_tokens - conv.trace_covered
    room = max_prompt_tokens - conv.context_tokens
    n = max(MIN_MESSAGE_TOKENS, min(wanted, room))
    n = min(n, request.prompt_tokens)
    start = conv.trace_covered if wanted >= n else request.prompt_tokens - n
    return Message(prompt_text(request.segments, start, start + n), n, capped=n < wanted)


def prompt_text(segments: Sequence[tuple[int, int, int]], start: int, end: int) -> str:
    """Text of prompt positions [start, end): one sim-tokenizer token per position.

    A RANGE id becomes a fixed word; an ANSWER segment (a previous answer inside a synthetic
    prompt, only reached when a conversation is capped) becomes the words that answer's
    seed samples. Each piece is one token and pieces never merge, so the count is exact.
    """
    ids: list[int] = []
    pos = 0
    for kind, a, n in segments:
        lo, hi = max(start, pos), min(end, pos + n)
        if lo < hi:
            if kind == RANGE:
                ids.extend(_TOKENIZER.sample_many(PROMPT_WORD_SEED, a + lo - pos, hi - lo))
            else:
                ids.extend(_TOKENIZER.sample_many(a, lo - pos, hi - lo))
        pos += n
        if pos >= end:
            break
    return _TOKENIZER.decode(ids)


# -- the run ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadProgress:
    elapsed_s: float
    planned: int
    issued: int
    in_flight: int
    outcomes: Counter[str]


async def run_load(
    config: LoadConfig,
    on_progress: Callable[[LoadProgress], None] | None = None,
    progress_interval_s: float = 2.0,
    stop: asyncio.Event | None = None,
    client: TurnClient | None = None,
) -> LoadReport:
    """Replay `config.trace` against the gateway and return every request's record.

    Setting `stop` ends issuing (requests not yet due are left out of the report) and waits
    for the requests in flight. `client` replaces the gRPC/HTTP client (tests, other transports);
    it is closed at the end like the built-in ones.
    """
    config.validate()
    trace = config.trace
    if not isinstance(trace, Trace):
        trace = load_trace(trace, seed=config.seed, synthetic=config.synthetic)
    schedule = plan(trace, config.rate_scale, config.rate, config.duration_s, config.requests, config.seed)
    if client is None:
        client = await _open_client(config)
    try:
        run = _Run(config, schedule, client)
        wall = await run.go(on_progress, progress_interval_s, stop)
    finally:
        await client.close()
    return LoadReport(
        records=run.records,
        trace=trace.name,
        transport="http" if config.http else "grpc",
        target=config.http or config.gateway,
        planned=len(schedule),
        schedule_span_s=schedule[-1].at_s if schedule else 0.0,
        wall_s=wall,
    )


async def _open_client(config: LoadConfig) -> TurnClient:
    if not config.http:
        return GrpcTurns(config.gateway, config.api_key, config.tls_ca, config.model)
    http = HttpTurns(config.http, config.api_key, config.tls_ca, config.model, config.max_in_flight)
    try:
        await http.resolve_model()  # the OpenAI API needs a model name in every request
    except BaseException:
        await http.close()
        raise
    return http


class _Run:
    def __init__(self, config: LoadConfig, schedule: list[Planned], client: TurnClient) -> None:
        self._config = config
        self._schedule = schedule
        self._client = client
        self._slots = asyncio.Semaphore(config.max_in_flight)
        self._in_flight = 0
        self._start = 0.0
        self.records: list[RequestRecord] = []
        self.outcomes: Counter[str] = Counter()
        turns = Counter(p.request.session_id for p in schedule)
        # Pins live in Redis under the tenant: a fresh prefix keeps a rerun off the last run's.
        run_id = uuid.uuid4().hex[:8]
        self._conversations = {
            key: Conversation(key, n, affinity=f"load-{run_id}-{key}" if n > 1 else "")
            for key, n in turns.items()
        }

    async def go(
        self,
        on_progress: Callable[[LoadProgress], None] | None,
        interval_s: float,
        stop: asyncio.Event | None,
    ) -> float:
        self._start = time.monotonic()
        reporter = asyncio.create_task(self._report(on_progress, interval_s)) if on_progress else None
        last: dict[str, asyncio.Task[None]] = {}
        sent: Counter[str] = Counter()
        tasks: list[asyncio.Task[None]] = []
        stop = stop or asyncio.Event()
        for index, planned in enumerate(self._schedule):
            delay = self._start + planned.at_s - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                break
            r = planned.request
            conv = self._conversations[r.session_id]
            record = RequestRecord(
                index=index,
                request_id=r.request_id,
                conversation=r.session_id,
                turn=sent[r.session_id],
                scheduled_s=planned.at_s,
                trace_prompt_tokens=r.prompt_tokens,
                trace_output_tokens=r.output_tokens,
            )
            self.records.append(record)
            sent[r.session_id] += 1
            task = asyncio.create_task(self._turn(conv, r, record, last.get(r.session_id)))
            last[r.session_id] = task
            tasks.append(task)
        await asyncio.gather(*tasks)
        if reporter is not None:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
            assert on_progress is not None
            on_progress(self._snapshot())
        issued = [rec for rec in self.records if not math.isnan(rec.issued_s)]
        if not issued:
            return 0.0
        first = min(rec.issued_s for rec in issued)
        last_end = max(rec.issued_s + (rec.e2e_s or 0.0) for rec in issued)
        return last_end - first

    async def _turn(
        self, conv: Conversation, r: TraceRequest, record: RequestRecord, previous: asyncio.Task[None] | None
    ) -> None:
        # Ready at its arrival time, or when the previous turn is answered (the user reads it
        # first), whichever is later; any delay past that (a busy loop, the cap) is lag.
        record.ready_s = record.scheduled_s
        if previous is not None:
            await asyncio.wait([previous])
            record.ready_s = max(record.scheduled_s, time.monotonic() - self._start)
        if self._slots.locked():
            record.late = True
            if self._config.on_full == "drop":
                record.outcome = DROPPED
                self._finish(conv, r, record)
                return
        async with self._slots:
            self._in_flight += 1
            try:
                await self._attempts(conv, r, record)
            except Exception as exc:
                # A bug on our side (or a reply no client code expects): one record says so, and
                # the rest of an hour-long run still gets its report.
                log.exception("request %s failed in the load generator", r.request_id)
                record.outcome = f"error:client_{type(exc).__name__}"
            finally:
                self._in_flight -= 1
                self._finish(conv, r, record)

    async def _attempts(self, conv: Conversation, r: TraceRequest, record: RequestRecord) -> None:
        config = self._config
        message = next_message(r, conv, config.max_prompt_tokens)
        record.message_tokens, record.prompt_capped = message.tokens, message.capped
        record.max_tokens = min(r.output_tokens, config.max_tokens)
        started = time.monotonic()
        record.issued_s = started - self._start
        idempotency_key = uuid.uuid4().hex  # the same for every attempt: a retry never stores twice
        for attempt in range(config.retries + 1):
            result = await self._client.turn(
                conv, message.text, record.max_tokens, config.timeout_s, idempotency_key
            )
            _fill(record, result, started, conv)
            if result.status == "ok":
                if config.text_check and record.engine in ("sim", ""):
                    record.text_tokens = len(_TOKENIZER.encode(record.text))
                return
            retry = result.status == "retry" or (result.status == "shed" and config.retry_shed)
            if retry and attempt < config.retries:
                record.retries += 1
                await sleep_before_retry(attempt, result.pushback_ms)
                continue
            return

    def _finish(self, conv: Conversation, r: TraceRequest, record: RequestRecord) -> None:
        # The trace's next turn starts after this prompt and its answer, answered or not; what the
        # conversation really holds grows only by acknowledged turns.
        conv.trace_covered = r.prompt_tokens + r.output_tokens
        if record.outcome == OK:
            conv.context_tokens += record.message_tokens + record.completion_tokens
        self.outcomes[record.outcome.partition(":")[0]] += 1

    def _snapshot(self) -> LoadProgress:
        issued = sum(1 for rec in self.records if not math.isnan(rec.issued_s))
        return LoadProgress(
            time.monotonic() - self._start,
            len(self._schedule),
            issued,
            self._in_flight,
            Counter(self.outcomes),
        )

    async def _report(self, on_progress: Callable[[LoadProgress], None], interval_s: float) -> None:
        while True:
            on_progress(self._snapshot())
            await asyncio.sleep(interval_s)


def _fill(record: RequestRecord, result: TurnResult, started: float, conv: Conversation) -> None:
    """The record from the latest attempt (the one the user ends up with)."""
    record.session_id = conv.session_id or conv.affinity
    record.pushback_ms = result.pushback_ms
    record.e2e_s = result.ended_at - started
    if result.worker_id:  # where it was placed, even if it failed there
        record.worker_id, record.region, record.engine = result.worker_id, result.region, result.engine
    if result.status == "ok":
        record.outcome = OK
        record.text = result.text
        record.ttft_s = None if result.first_token_at is None else result.first_token_at - started
        record.itl_s = result.gaps
        record.prompt_tokens, record.cached_tokens = result.prompt_tokens, result.cached_tokens
        record.completion_tokens, record.resumed = result.completion_tokens, result.resumed
        record.cache_hit, record.turn_index = result.cache_hit, result.turn_index
    elif result.status == "shed":
        record.outcome, record.shed_reason = SHED, result.shed_reason
    else:
        record.outcome = f"error:{result.code}"
