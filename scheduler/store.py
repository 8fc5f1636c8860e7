"""Scheduler state in Redis: worker registry, reservations (atomic Lua), session pins."""

from __future__ import annotations

import enum
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources

import redis.asyncio as redis
from redis.asyncio.client import Pipeline

from kvgate.redis_conn import as_str
from kvgate.v1 import telemetry_pb2
from scheduler import keys
from scheduler.policy import FleetView, WorkerState, WorkerView
from scheduler.redis_mux import RedisMux, ScriptRef

_LIFECYCLE_TO_STATE = {
    telemetry_pb2.WORKER_LIFECYCLE_READY: WorkerState.READY,
    telemetry_pb2.WORKER_LIFECYCLE_DRAINING: WorkerState.DRAINING,
    telemetry_pb2.WORKER_LIFECYCLE_OFFLINE: WorkerState.OFFLINE,
}


_DEFAULTS = WorkerView("", "", "", WorkerState.READY, 16, 0, 0)
DEFAULT_PREFILL_TOKENS_PER_S = _DEFAULTS.prefill_tokens_per_s
DEFAULT_MAX_NUM_SEQS = _DEFAULTS.max_num_seqs
# The ingest advances the telemetry clock every TELEMETRY_CLOCK_TICK_S while connected; ages
# freeze once it is more than the slack behind. The ttl only cleans up after the last scheduler.
TELEMETRY_CLOCK_TICK_S = 1.0
TELEMETRY_CLOCK_SLACK_MS = 3000
TELEMETRY_CLOCK_TTL_MS = 24 * 3600 * 1000

log = logging.getLogger(__name__)

# The worker info hash fields a FleetView is built from, in the order read_fleet unpacks them.
_VIEW_FIELDS = (
    "region", "model", "state", "block_size", "blocks_total", "blocks_used", "blocks_cached",
    "reserved", "running", "waiting", "step_ms", "tokens_per_s", "arithmetic_intensity",
    "prefill_tokens_per_s", "max_num_seqs", "seen_ms", "address", "engine",
)  # fmt: skip

# What redis-py accepts as a hash field or value.
_RedisField = str | bytes | bytearray | memoryview | int | float


def _lua(name: str, *, reservations: bool = False, telemetry: bool = False) -> str:
    def read(file: str) -> str:
        return (resources.files("scheduler") / "lua" / file).read_text()

    source = read(name)
    if telemetry:
        # Scripts that apply telemetry share how they tell a worker's processes apart.
        source = read("incarnation.lua") + source
    if reservations:
        # Scripts that touch reservations share one definition of how they are kept.
        source = read("reservations.lua") + source
    return source


class ReserveStatus(enum.IntEnum):
    RESERVED = 1
    NO_ROOM = 0
    UNKNOWN_WORKER = -1
    NOT_ACCEPTING = -2


class Applied(enum.IntEnum):
    """What became of one telemetry message (the reply of the telemetry scripts)."""

    APPLIED = 1
    DUPLICATE = 0  # another replica (or this one) applied it, or a newer one came first
    STALE = -1  # from an older process of the worker (incarnation.lua)


@dataclass(frozen=True)
class TelemetryResult:
    applied: Applied
    # The worker went offline or restarted (its KV cache is gone): invalidate_pins() is due, by
    # the one replica whose script saw it.
    pins_invalid: bool = False


@dataclass(frozen=True)
class ReserveResult:
    status: ReserveStatus
    free_after: int


@dataclass(frozen=True)
class StoreSettings:
    reservation_ttl_s: float = 30.0
    pin_idle_ttl_s: float = 3600.0
    dead_after_s: float = 10.0
    stale_after_s: float = 2.0
    # A worker's block set lives this long after its last telemetry, and a block's entry in the
    # block -> workers index this long after a worker last stored it or a placement last found
    # it cached (a hot system prompt is stored once and then only hit). Both are bounded anyway:
    # they mirror the blocks the workers hold; the ttl cleans up after events that were lost.
    prefix_index_ttl_s: float = 600.0


# A replica refreshes the ttl of a block found cached at most once per this fraction of the
# ttl, and remembers that for this many blocks (the hot ones: the rest expire as they should).
PREFIX_REFRESH_FRACTION = 0.25
PREFIX_REFRESH_MEMORY = 65_536

# The first lookup round asks which of up to this many workers hold the prompt's first block
# (a reply of one integer each); a larger fleet serving the model skips that and pays the
# second round when there are hits.
MAX_PROBED_WORKERS = 256


class FleetStore:
    def __init__(self, client: redis.Redis, settings: StoreSettings) -> None:
        self._redis = client
        self.settings = settings
        # The placement hot path (lookup, reserve, pin writes) goes through one pipelined
        # connection; everything else uses redis-py (see redis_mux.py for why).
        self._mux = RedisMux.like(client)
        self._reserve = ScriptRef.of(_lua("reserve.lua", reservations=True))
        # On the placement connection too: a give-back sent after a reserve whose reply never came
        # (a cancelled Place) reaches Redis after it, on the same connection, and so undoes it.
        self._release = ScriptRef.of(_lua("release.lua", reservations=True))
        self._ingest = client.register_script(_lua("ingest_stats.lua", reservations=True, telemetry=True))
        self._ingest_status = client.register_script(_lua("ingest_status.lua", telemetry=True))
        self._ingest_kv = client.register_script(_lua("ingest_kv.lua", telemetry=True))
        self._unpin = client.register_script(_lua("unpin.lua"))
        self._drain = client.register_script(_lua("drain.lua"))
        self._tick_clock = client.register_script(_lua("telemetry_clock.lua"))
        self._prefix_ttl_ms = int(settings.prefix_index_ttl_s * 1000)
        # Block hash -> when this replica last refreshed its index entry's ttl (monotonic s).
        self._prefix_refreshed: OrderedDict[int, float] = OrderedDict()
        # Telemetry clock + slack (ms) when the broker is away, 0 when telemetry flows.
        self.frozen_clock_ms = 0
        # When telemetry last resumed after a gap (ms, 0: never): when the broker comes back,
        # workers get --dead-after from then to reconnect before their silence counts.
        self.resumed_ms = 0

    async def ingest_stats(self, stats: telemetry_pb2.WorkerStats) -> TelemetryResult:
        state = _LIFECYCLE_TO_STATE.get(stats.state, WorkerState.READY)
        fields: list[str | int | float] = [
            "region", stats.region, "address", stats.address, "model", stats.model,
            "engine", stats.engine, "gpu", stats.gpu, "block_size", stats.block_size,
            "blocks_total", stats.num_blocks_total, "blocks_used", stats.num_blocks_used,
            "blocks_cached", stats.num_blocks_cached, "running", stats.running,
            "waiting", stats.waiting, "step_ms", stats.step_ms, "tokens_per_s", stats.tokens_per_s,
            "arithmetic_intensity", stats.arithmetic_intensity,
            "prefill_tokens_per_s", stats.prefill_tokens_per_s, "max_num_seqs", stats.max_num_seqs,
        ]  # fmt: skip
        wid = stats.worker_id
        args = [
            stats.seq, state.value, stats.incarnation, self._prefix_ttl_ms, *fields,
            "--", *stats.admitted_request_ids,
        ]  # fmt: skip
        reply = await self._ingest(
            keys=[*keys.worker_reservation_keys(wid), keys.worker_blocks(wid)], args=args
        )
        result = await self._after_telemetry(wid, reply)
        await self._redis.sadd(keys.WORKERS, wid)
        return result

    async def ingest_status(self, status: telemetry_pb2.WorkerStatus) -> TelemetryResult:
        state = _LIFECYCLE_TO_STATE.get(status.state, WorkerState.OFFLINE)
        wid = status.worker_id
        fields: list[str] = []
        for field in ("region", "address", "model", "engine", "gpu"):
            value = getattr(status, field)
            if value:
                fields += [field, value]
        reply = await self._ingest_status(
            keys=[*keys.worker_reservation_keys(wid), keys.worker_blocks(wid)],
            args=[state.value, status.incarnation, *fields],
        )
        result = await self._after_telemetry(wid, reply)
        await self._redis.sadd(keys.WORKERS, wid)
        return result

    async def ingest_kv(self, events: telemetry_pb2.KvEvents) -> TelemetryResult:
        wid = events.worker_id
        reply = await self._ingest_kv(
            keys=[keys.worker_info(wid), keys.worker_blocks(wid)],
            args=[
                events.seq,
                "1" if events.all_cleared else "0",
                self._prefix_ttl_ms,
                events.incarnation,
                len(events.stored_block_hashes),
                *events.stored_block_hashes,
                *events.removed_block_hashes,
            ],
        )
        # Mirror the applied batch into the block -> workers index. Block keys live in many
        # Cluster slots, so this is a pipeline after the worker's script rather than part of it:
        # should two replicas' mirrors of consecutive batches interleave, a stale entry can
        # survive until the next refresh_prefix checks it or its ttl, which costs a wrong guess
        # of a cached prefix, never a wrong commit (reservations are checked against the
        # worker's own accounting).
        result, dropped = _telemetry_reply(reply)
        applied = result.applied == Applied.APPLIED
        if applied or dropped:
            async with self._redis.pipeline(transaction=False) as pipe:
                _queue_unindex(pipe, wid, dropped)
                if applied:
                    for block_hash in events.stored_block_hashes:
                        key = keys.block_workers(block_hash)
                        pipe.sadd(key, wid)
                        pipe.pexpire(key, self._prefix_ttl_ms)
                    _queue_unindex(pipe, wid, events.removed_block_hashes)
                await pipe.execute()
        return result

    async def _after_telemetry(self, worker_id: str, reply: list[bytes | int]) -> TelemetryResult:
        """The blocks a telemetry script dropped from the worker's set leave the block -> workers
        index (many slots, so not in the script)."""
        result, dropped = _telemetry_reply(reply)
        if dropped:
            async with self._redis.pipeline(transaction=False) as pipe:
                _queue_unindex(pipe, worker_id, dropped)
                await pipe.execute()
        return result

    async def invalidate_pins(self, worker_id: str, before_ms: int, batch: int = 1000) -> int:
        """Drop the pins of the sessions pinned to the worker before `before_ms` (Unix ms: when it
        went offline or restarted; a session pinned to its new process since keeps its pin), in
        batches. Each pin is in its session's slot, so one script per session, and only a pin still
        naming this worker goes (another replica may have moved it). Returns how many went."""
        pins = keys.worker_pins(worker_id)
        # The index scores a pin by its expiry: written at t, it scores t + ttl.
        until = before_ms + int(self.settings.pin_idle_ttl_s * 1000)
        dropped = 0
        while True:
            raw = await self._redis.zrangebyscore(pins, "-inf", until, start=0, num=batch)
            sessions = [as_str(s) for s in raw if isinstance(s, bytes | str)]
            if not sessions:
                return dropped
            async with self._redis.pipeline(transaction=False) as pipe:
                for session in sessions:
                    await self._unpin(keys=[keys.session_pin(session)], args=[worker_id], client=pipe)
                pipe.zrem(pins, *sessions)
                replies = await pipe.execute()
            dropped += sum(int(r) for r in replies[:-1])

    async def worker_address(self, worker_id: str) -> str:
        """Where the worker serves gRPC ("" if unknown)."""
        address = await self._redis.hget(keys.worker_info(worker_id), "address")
        return as_str(address) if address else ""

    async def lookup(
        self, session_id: str, worker_ids: list[str], block_hashes: list[int]
    ) -> tuple[str | None, dict[str, int]]:
        """The session's pin and, per worker among `worker_ids`, how many leading prompt blocks it
        has cached. Costs one command per prompt block, whatever the fleet's size, in at most two
        round trips: the pin and each block's holder count, then the holders only where that
        count changes. Hashes are chained and engines evict a cached sequence from its tail, so
        whoever holds block k holds blocks 1..k-1: the holders of the last block of each run of
        equal counts stand for the whole run, and a popular system prompt's 500 holders are read
        once, not once per block.

        The first round also asks which of the workers hold the first block. When the counts form
        a single run (a new conversation whose system prompt is cached, a short or repeated
        prompt: the common case) those are the holders of the whole run, so one round trip
        answers; a conversation that outgrew its shared prefix needs the second."""
        if not session_id and not block_hashes:
            return None, {}  # nothing to look up: no round trip
        wanted = set(worker_ids)
        asked = list(wanted)
        first: list[tuple[str, ...]] = [
            ("GET", keys.session_pin(session_id)) if session_id else ("ECHO", "")  # fixed positions
        ]
        first.extend(("SCARD", keys.block_workers(block_hash)) for block_hash in block_hashes)
        probe = bool(block_hashes) and 0 < len(asked) <= MAX_PROBED_WORKERS
        if probe:
            first.append(("SMISMEMBER", keys.block_workers(block_hashes[0]), *asked))
        replies = await self._mux.execute_many(first, retry=True)
        _raise_first_error(replies)
        raw_pin = replies[0]
        pin = as_str(raw_pin) if raw_pin else None
        counts = [int(c) for c in replies[1 : 1 + len(block_hashes)]]
        # Positions (1-based) that end a run of equal, non-zero holder counts, up to the first 0.
        ends: list[int] = []
        for position, count in enumerate(counts, start=1):
            if count == 0:
                break
            if position == len(counts) or counts[position] != count:
                ends.append(position)
        hits: dict[str, int] = {}
        if not ends or not worker_ids:
            return pin, hits
        if probe and len(ends) == 1:
            for wid, present in zip(asked, replies[-1], strict=True):
                if present:
                    hits[wid] = ends[0]
            return pin, hits
        # Per run end, whichever reply is smaller: its holders, or a yes/no per wanted worker.
        second: list[tuple[str, ...]] = []
        for position in ends:
            key = keys.block_workers(block_hashes[position - 1])
            if counts[position - 1] <= len(asked):
                second.append(("SMEMBERS", key))
            else:
                second.append(("SMISMEMBER", key, *asked))
        replies = await self._mux.execute_many(second, retry=True)
        _raise_first_error(replies)
        # Later runs overwrite earlier ones: a worker's count is the deepest run it holds.
        for position, reply in zip(ends, replies, strict=True):
            if counts[position - 1] <= len(asked):
                for member in reply:
                    wid = as_str(member)
                    if wid in wanted:
                        hits[wid] = position
            else:
                for wid, present in zip(asked, reply, strict=True):
                    if present:
                        hits[wid] = position
        return pin, hits

    async def refresh_prefix(self, block_hashes: Sequence[int], holders: Mapping[str, int]) -> None:
        """Keep the index entries of a prompt's blocks that a lookup found cached alive, checked
        against the holders' own block sets. A worker reports a block when it stores it, never
        when it hits it, so a prefix every conversation shares would otherwise drop out of the
        index a ttl after it was first cached. But the ttl is what ends an entry whose removal
        was lost (two replicas' mirrors interleaving), so before refreshing, each holder the lookup
        reported (worker -> leading blocks held) is checked against its authoritative block set
        and dropped from the blocks it no longer holds. Off the hot path (after the placement is
        answered); each replica refreshes a block at most every quarter ttl."""
        now = time.monotonic()
        due_before = now - self.settings.prefix_index_ttl_s * PREFIX_REFRESH_FRACTION
        refreshed = self._prefix_refreshed
        due = False
        for block_hash in block_hashes:
            last = refreshed.get(block_hash)
            if last is None or last < due_before:
                due = True
                refreshed[block_hash] = now
                refreshed.move_to_end(block_hash)
        while len(refreshed) > PREFIX_REFRESH_MEMORY:
            refreshed.popitem(last=False)
        if not due:
            return
        # Holding block k means holding 1..k-1 (chained hashes, tail-first eviction): one check per
        # holder, of the deepest block the index credits it with.
        held = list(holders.items())
        checks = await self._mux.execute_many(
            [("SISMEMBER", keys.worker_blocks(w), block_hashes[depth - 1]) for w, depth in held]
        )
        _raise_first_error(checks)
        stale = [(w, depth) for (w, depth), present in zip(held, checks, strict=True) if not present]
        commands: list[tuple[str | int, ...]] = []
        if stale:
            members = await self._mux.execute_many(
                [("SMISMEMBER", keys.worker_blocks(w), *block_hashes[:depth]) for w, depth in stale]
            )
            _raise_first_error(members)
            for (w, depth), present in zip(stale, members, strict=True):
                commands.extend(
                    ("SREM", keys.block_workers(h), w)
                    for h, has in zip(block_hashes[:depth], present, strict=True)
                    if not has
                )
        ttl = self._prefix_ttl_ms
        commands.extend(("PEXPIRE", keys.block_workers(h), ttl) for h in block_hashes)
        _raise_first_error(await self._mux.execute_many(commands))

    async def read_fleet(self) -> FleetView:
        members = await self._mux.execute("SMEMBERS", keys.WORKERS, retry=True)
        ids = sorted(as_str(m) for m in members)
        commands: list[tuple[str, ...]] = [
            ("TIME",),
            ("GET", keys.TELEMETRY_CLOCK),
            ("GET", keys.TELEMETRY_RESUMED),
        ]
        commands.extend(("HMGET", keys.worker_info(wid), *_VIEW_FIELDS) for wid in ids)
        replies = await self._mux.execute_many(commands, retry=True)
        _raise_first_error(replies)
        seconds, micros = replies[0]
        now_ms = self._age_clock_ms(int(seconds) * 1000 + int(micros) // 1000, replies[1])
        self.resumed_ms = resumed_ms = int(replies[2] or 0)
        workers: dict[str, WorkerView] = {}
        # Positional, in _VIEW_FIELDS order: this runs for every worker ten times a second.
        for wid, values in zip(ids, replies[3:], strict=True):
            (
                region, model, state, block_size, blocks_total, blocks_used, blocks_cached, reserved,
                running, waiting, step_ms, tokens_per_s, intensity, prefill_rate, max_seqs, seen_ms,
                address, engine,
            ) = values  # fmt: skip
            if blocks_total is None:
                continue
            workers[wid] = WorkerView(
                worker_id=wid,
                region=region.decode() if region else "",
                model=model.decode() if model else "",
                state=WorkerState(state.decode() if state else "offline"),
                block_size=int(block_size or 16),
                num_blocks_total=int(blocks_total),
                num_blocks_used=int(blocks_used or 0),
                num_blocks_cached=int(blocks_cached or 0),
                reserved_tokens=max(0, int(reserved or 0)),
                running=int(running or 0),
                waiting=int(waiting or 0),
                step_ms=float(step_ms or 0),
                tokens_per_s=float(tokens_per_s or 0),
                arithmetic_intensity=float(intensity or 0),
                # Workers that do not report these (0) keep the policy's defaults.
                prefill_tokens_per_s=float(prefill_rate or 0) or DEFAULT_PREFILL_TOKENS_PER_S,
                max_num_seqs=int(max_seqs or 0) or DEFAULT_MAX_NUM_SEQS,
                age_s=max(0.0, (now_ms - max(int(seen_ms or 0), resumed_ms)) / 1000),
                address=address.decode() if address else "",
                engine=engine.decode() if engine else "",
            )
        return FleetView(
            workers, dead_after_s=self.settings.dead_after_s, stale_after_s=self.settings.stale_after_s
        )

    def _age_clock_ms(self, now_ms: int, clock: bytes | str | None) -> int:
        """The time worker ages are measured at. While some ingest is connected to the broker the
        clock is within a second of Redis time and this is now. When the broker is away no
        telemetry arrives for anyone; that says nothing about the workers, so their ages stop at
        the last moment the broker was seen (plus one heartbeat of slack): placements go on with
        the last telemetry plus the reservations made since, and the gateway's failover covers a
        worker that really died meanwhile. With no clock at all (no ingest yet) ages use now."""
        if clock is None:
            self.frozen_clock_ms = 0
            return now_ms
        frozen_at = int(clock) + TELEMETRY_CLOCK_SLACK_MS
        if frozen_at >= now_ms:
            self.frozen_clock_ms = 0
            return now_ms
        if not self.frozen_clock_ms:
            log.warning(
                "no telemetry ingest connected to the broker for %.1fs: worker ages frozen at the "
                "last broker contact",
                (now_ms - int(clock)) / 1000,
            )
        self.frozen_clock_ms = frozen_at
        return frozen_at

    async def tick_telemetry_clock(self) -> None:
        """Advance the telemetry clock (the ingest calls this while connected to the broker)."""
        await self._tick_clock(
            keys=[keys.TELEMETRY_CLOCK, keys.TELEMETRY_RESUMED],
            args=[TELEMETRY_CLOCK_TTL_MS, TELEMETRY_CLOCK_SLACK_MS],
        )

    async def reserve(
        self,
        worker_id: str,
        request_id: str,
        tokens: int,
        *,
        headroom_fraction: float = 0.0,
        allow_draining: bool = False,
    ) -> ReserveResult:
        """Reserve `tokens` if they fit in the worker's free KV less `headroom_fraction` of its
        capacity (the request tier's headroom, kept for higher tiers)."""
        # Safe to resend: a retried request id replaces its own reservation (reserve.lua).
        status, free_after = await self._mux.evalsha(
            self._reserve,
            keys.worker_reservation_keys(worker_id),
            [
                request_id,
                tokens,
                int(self.settings.reservation_ttl_s * 1000),
                int(self.settings.dead_after_s * 1000),
                "1" if allow_draining else "0",
                self.frozen_clock_ms,
                self.resumed_ms,
                repr(float(headroom_fraction)),
            ],
            retry=True,
        )
        return ReserveResult(ReserveStatus(int(status)), int(free_after))

    async def release(self, worker_id: str, request_id: str) -> bool:
        # Safe to resend: releasing a reservation that is gone is a no-op.
        released = await self._mux.evalsha(
            self._release, keys.worker_reservation_keys(worker_id), [request_id], retry=True
        )
        return bool(released)

    async def reserved_tokens(self, worker_id: str) -> int:
        """Sum of the worker's reservation hash (for checks; placement uses the running total)."""
        values = await self._redis.hvals(keys.worker_reservations(worker_id))
        return sum(int(v) for v in values)

    async def record_placement(
        self, session_id: str, worker_id: str, previous_worker: str | None, outcome: str
    ) -> None:
        """Pin the session (idle TTL), index the pin under its worker for status, count the outcome."""
        ttl_ms = int(self.settings.pin_idle_ttl_s * 1000)
        now_ms = int(time.time() * 1000)
        commands: list[tuple[str | int, ...]] = []
        if session_id:
            commands.append(("SET", keys.session_pin(session_id), worker_id, "PX", ttl_ms))
            pins = keys.worker_pins(worker_id)
            # Expired entries go here, in the same write, so the index stays bounded by the
            # sessions pinned within one idle ttl whether or not anyone runs `kvgate status`.
            commands.append(("ZREMRANGEBYSCORE", pins, "-inf", now_ms))
            commands.append(("ZADD", pins, now_ms + ttl_ms, session_id))
            commands.append(("PEXPIRE", pins, ttl_ms))
            if previous_worker and previous_worker != worker_id:
                commands.append(("ZREM", keys.worker_pins(previous_worker), session_id))
        commands.append(("HINCRBY", keys.PLACEMENTS_BY_OUTCOME, outcome, 1))
        _raise_first_error(await self._mux.execute_many(commands))

    async def status_extras(self, worker_ids: list[str]) -> dict[str, tuple[int, int]]:
        """Per worker (pinned sessions, prefix blocks indexed): for status views, not placement."""
        now_ms = int(time.time() * 1000)
        async with self._redis.pipeline(transaction=False) as pipe:
            for wid in worker_ids:
                pipe.zremrangebyscore(keys.worker_pins(wid), "-inf", now_ms)
                pipe.zcard(keys.worker_pins(wid))
                pipe.scard(keys.worker_blocks(wid))
            replies = await pipe.execute()
        return {wid: (int(replies[3 * i + 1]), int(replies[3 * i + 2])) for i, wid in enumerate(worker_ids)}

    async def placement_counts(self) -> dict[str, int]:
        return {k: int(v) for k, v in _decode(await self._redis.hgetall(keys.PLACEMENTS_BY_OUTCOME)).items()}

    async def set_draining(self, worker_id: str) -> bool:
        """Drain a worker from the scheduler's side: no new sessions land on it from now on, even
        if the worker never hears of it (the telemetry scripts keep the state until it restarts)."""
        return bool(await self._drain(keys=[keys.worker_info(worker_id)]))

    async def count_shed(self, tier: str) -> None:
        await self._mux.execute("HINCRBY", keys.SHED_BY_TIER, tier, 1)

    async def shed_counts(self) -> dict[str, int]:
        return {k: int(v) for k, v in _decode(await self._redis.hgetall(keys.SHED_BY_TIER)).items()}

    async def aclose(self) -> None:
        """Close the placement connection (the redis-py client belongs to the caller)."""
        await self._mux.aclose()

    async def ping_ms(self) -> float:
        start = time.perf_counter()
        await self._redis.ping()
        return (time.perf_counter() - start) * 1000


def _telemetry_reply(reply: list[bytes | int]) -> tuple[TelemetryResult, list[bytes | int]]:
    """A telemetry script's reply (incarnation.lua's telemetry_reply): its result, and the block
    hashes the worker no longer holds."""
    return TelemetryResult(Applied(int(reply[0])), bool(int(reply[1]))), reply[2:]


def _queue_unindex(pipe: Pipeline, worker_id: str, block_hashes: Sequence[bytes | int]) -> None:
    for block_hash in block_hashes:
        pipe.srem(keys.block_workers(int(block_hash)), worker_id)


def _raise_first_error(replies: list[object]) -> None:
    for reply in replies:
        if isinstance(reply, redis.ResponseError):
            raise reply


def _decode(
    raw: Mapping[bytes, bytes] | Mapping[str, str] | Mapping[bytes | str, bytes | str],
) -> dict[str, str]:
    return {as_str(k): as_str(v) for k, v in raw.items()}
