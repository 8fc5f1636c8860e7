"""The fleet simulator's event loop: SimEngines on a virtual clock behind a placement policy.

Pure (no I/O, no asyncio, no wall clock in any decision): one heap of events on a virtual clock,
arrivals streamed from the trace in order. Deterministic for a given trace, fleet, policy and
seed: ties on the clock are broken by the order events were scheduled.

The scheduler side mirrors the live one (scheduler/servicer.py, store.py, the Lua scripts):

- it places with the policy object the live scheduler uses, on a FleetView built from each
  engine's stats() as of the last telemetry tick, plus its own outstanding reservations;
- a placement reserves the request's tokens on the chosen worker (committed only if
  (telemetry free - reserved) still covers them, as reserve.lua checks) and pins the session;
  the reservation is released at the first telemetry tick at which the engine's stats list
  the request (its prompt KV allocated: not while it waits for room), or when it ends;
- the prefix index (block hash -> workers) is built from each engine's take_kv_events() at
  telemetry ticks, stored hashes applied before removed ones, as ingest_kv.lua does;
- a placement that asks to wait for a full pinned worker (Placed.wait_for_pinned) is retried
  at each telemetry tick until it fits or its wait runs out, then falls back to the other
  candidates, as the servicer's bounded commit loop does;
- the request reaches the worker `placement_delay_s` after it arrived (gateway -> scheduler ->
  worker RPCs); TTFT and end-to-end latency are measured from the arrival.

The worker side: each worker is a FleetEngine. An idle worker that receives a request starts
a step at once; a busy one takes it in between steps (admitted by the engine at its next step,
as vLLM does). A general step is applied when it starts (vLLM allocates blocks when it
schedules a step) and its tokens count at its end. A run of pure-decode steps up to the
engine's next event (steps_until_event) is only planned when it starts and applied when it ends,
or earlier when a request arrives in the middle: then the run is cut after the step in flight.
"""

from __future__ import annotations

import gc
import heapq
import time
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields

from gpu_worker.engine import EngineError, EngineStats
from gpu_worker.sim.engine import EngineConfig, JumpOutput, StepOutput
from gpu_worker.sim.profiles import get_gpu, get_model
from gpu_worker.sim.roofline import step_cost
from gpu_worker.sim.tokenizer import SimTokenizer
from scheduler.fleetsim.bounds import InfiniteCache, PooledLru
from scheduler.fleetsim.engine import FleetEngine
from scheduler.fleetsim.metrics import RunData
from scheduler.fleetsim.trace import PrefixHasher, Trace, TraceRequest, prompt_token_ids, tier_of
from scheduler.policy import FleetView, Pipeline, PlacementRequest, Policy, Shed, WorkerState, WorkerView
from scheduler.policy.fleet_index import IndexedFleetView

# Event kinds. Their order does not matter: ties on the clock go by scheduling order.
_TICK = 0
_DELIVER = 1
_DONE = 2
_PIN_DEADLINE = 3

# Worker modes.
_IDLE = 0
_BUSY = 1  # a step (or a cut decode run) is applied; its DONE event is pending
_PLANNED = 2  # a decode run is planned but not applied yet


@dataclass(frozen=True)
class WorkerSpec:
    worker_id: str
    gpu: str
    region: str


@dataclass(frozen=True)
class SimConfig:
    model: str = "llama-3-8b"
    # Telemetry period of the live workers (gpu_worker telemetry default).
    telemetry_interval_s: float = 0.25
    # Gateway -> scheduler -> worker RPCs before the engine sees the request. 2 ms: two
    # in-region gRPC hops. Cross-region placements are not charged more (DESIGN: region is a
    # failure-domain label, and ~100 ms would be small next to generation anyway).
    placement_delay_s: float = 0.002
    num_gpu_blocks: int | None = None
    # None: the model's own limit, lifted to the trace's longest request if that is longer
    # (Mooncake prompts reach 191k tokens; the KV capacity and timing model do not depend on it).
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    # Live scheduler default (scheduler/store.py pin_idle_ttl_s).
    pin_idle_ttl_s: float = 3600.0
    # Bound of the live servicer's wait for a full pinned worker (MAX_PIN_WAIT_S).
    max_pin_wait_s: float = 5.0
    # Per-worker KV utilisation samples for plots: about this many per worker over the run.
    worker_samples: int = 0
    # Experiment: never tell the policy about pins (placement then follows the prefix index
    # alone). Not how the live scheduler works; measures what the pin rule costs or gains.
    ignore_pins: bool = False
    # The engines' automatic prefix caching. None: on when the trace can share KV blocks, off
    # when every request's tokens are unique (Azure): no request can then hit another's
    # blocks, so results are the same except that a preempted request recomputes all of its
    # tokens instead of re-hitting its own blocks (when not evicted meanwhile), and the engines
    # skip hashing every prompt and answer (half the engine time on those traces).
    prefix_caching: bool | None = None
    # False: one engine step per event, never a multi-step jump. Slow; the reference the
    # tests hold the jumping loop to.
    use_jumps: bool = True


def parse_workers(spec: str, regions: Sequence[str], default_gpu: str = "h100") -> list[WorkerSpec]:
    """`16` (that many default-GPU workers) or `h100:12,a100:4`; regions round-robin."""
    if not regions:
        raise ValueError("at least one region is needed")
    groups: list[tuple[str, int]] = []
    text = spec.strip()
    if text.isdigit():
        groups.append((default_gpu, int(text)))
    else:
        for part in text.split(","):
            gpu, sep, count = part.strip().partition(":")
            if not sep or not count.strip().isdigit():
                raise ValueError(f"bad worker spec {part!r}: expected GPU:COUNT (e.g. h100:12) or a count")
            get_gpu(gpu.strip())  # a clear error for an unknown profile
            groups.append((gpu.strip(), int(count)))
    workers: list[WorkerSpec] = []
    for gpu, n in groups:
        for _ in range(n):
            i = len(workers)
            workers.append(WorkerSpec(f"w{i:04d}-{gpu}", gpu, regions[i % len(regions)]))
    if not workers:
        raise ValueError(f"worker spec {spec!r} gives no workers")
    return workers


def prefill_tokens_per_s(gpu: str, model: str) -> float:
    """What a sim worker reports as its prefill rate (gpu_worker.server.prefill_tokens_per_s):
    a 2,048-token history recomputed in one step."""
    tokens = 2048
    return tokens / step_cost(get_gpu(gpu), get_model(model), 1, 0, 0, tokens, 0).seconds


_VIEW_FIELDS = frozenset(f.name for f in fields(WorkerView))
_new_object = object.__new__
_set_attr = object.__setattr__


def _derive_view(view: WorkerView, changes: dict[str, object]) -> WorkerView:
    """dataclasses.replace(view, **changes) at a fraction of the cost (one dict copy instead of
    __init__'s per-field object.__setattr__; WorkerView has no __post_init__). Cached properties
    are not carried over. A unit test checks it equals replace()."""
    d = {k: v for k, v in view.__dict__.items() if k in _VIEW_FIELDS}
    d.update(changes)
    new: WorkerView = _new_object(WorkerView)
    _set_attr(new, "__dict__", d)
    return new


class _Req:
    __slots__ = (
        "arrival",
        "candidates",
        "first_s",
        "hashes",
        "need",
        "outcome",
        "pin_wait",
        "pinned",
        "tier",
        "trace",
        "worker",
    )

    def __init__(self, trace: TraceRequest, tier: str, need: int) -> None:
        self.trace = trace
        self.tier = tier
        self.need = need
        self.arrival = trace.arrival_s
        self.first_s = -1.0
        self.worker = -1
        self.pin_wait = False
        self.outcome = ""
        self.pinned: str | None = None
        self.candidates: Sequence[str] = ()
        # Prompt block hashes when the trace shares prefixes (handed to the engine with the
        # prompt, so it does not hash it again); empty otherwise.
        self.hashes: list[int] = []


class _Worker:
    __slots__ = (
        "bit",
        "busy_gen",
        "delivered",
        "dirty",
        "engine",
        "engine_dirty",
        "idx",
        "mode",
        "planned_k",
        "prefill",
        "prefill_rate",
        "reserved",
        "run_start",
        "spec",
        "stats",
        "view",
        "waiters",
    )

    def __init__(self, idx: int, spec: WorkerSpec, engine: FleetEngine, prefill_rate: float) -> None:
        self.idx = idx
        self.spec = spec
        self.engine = engine
        self.bit = 1 << idx
        self.mode = _IDLE
        self.busy_gen = 0
        self.planned_k = 0
        self.run_start = 0.0
        self.reserved = 0
        # Requests delivered whose reservation (tokens) telemetry has not yet released.
        self.delivered: dict[str, int] = {}
        self.dirty = False
        self.engine_dirty = False
        self.prefill = 0
        self.prefill_rate = prefill_rate
        self.stats: EngineStats = engine.stats()
        self.view: WorkerView | None = None
        self.waiters: list[_Req] = []


ProgressFn = Callable[[float, int], None]


class FleetSim:
    def __init__(
        self,
        workers: Sequence[WorkerSpec],
        policy: Policy,
        trace: Trace,
        requests: Iterable[TraceRequest],
        config: SimConfig | None = None,
        progress: ProgressFn | None = None,
        bounds: tuple[InfiniteCache, PooledLru] | None = None,
    ) -> None:
        self.config = cfg = config or SimConfig()
        self.policy = policy
        self.trace = trace
        self._requests = requests
        self._progress = progress
        # Fed at each arrival with the hashes placement computes anyway (the bounds replay the
        # same stream in the same order), instead of hashing the trace a second time.
        self._bounds = bounds if trace.shares_prefixes else None
        model = get_model(cfg.model)
        max_len = cfg.max_model_len or max(model.max_model_len, trace.max_request_tokens)
        caching = trace.shares_prefixes if cfg.prefix_caching is None else cfg.prefix_caching
        self._workers: list[_Worker] = []
        self._by_id: dict[str, _Worker] = {}
        # One tokenizer for all engines: it is immutable once built (pure sampling functions),
        # and building one per engine took seconds on a thousand workers.
        tokenizer = SimTokenizer()
        for i, spec in enumerate(workers):
            engine = FleetEngine(
                EngineConfig(
                    gpu=spec.gpu,
                    model=cfg.model,
                    max_num_seqs=cfg.max_num_seqs,
                    max_num_batched_tokens=cfg.max_num_batched_tokens,
                    num_gpu_blocks_override=cfg.num_gpu_blocks,
                    max_model_len=max_len,
                    enable_prefix_caching=caching,
                ),
                tokenizer,
            )
            w = _Worker(i, spec, engine, prefill_tokens_per_s(spec.gpu, cfg.model))
            if spec.worker_id in self._by_id:
                raise ValueError(f"duplicate worker id {spec.worker_id}")
            self._workers.append(w)
            self._by_id[spec.worker_id] = w
        # The FleetView's mapping is updated in place (one entry per changed worker) rather than
        # rebuilt: the policy reads it only inside place().
        self._views: dict[str, WorkerView] = {}
        for w in self._workers:
            w.view = self._make_view(w)
            self._views[w.spec.worker_id] = w.view
        # Indexed for a pipeline that can use it (kvgate's: it then scores a few classes of
        # workers, not all of them); other policies read the plain mapping, updated in place.
        pipeline = getattr(policy, "pipeline", None)
        self.fleet: FleetView
        if isinstance(pipeline, Pipeline) and pipeline.indexable:
            indexed = IndexedFleetView(workers=self._views)
            self.fleet = indexed
            self._put_view: Callable[[WorkerView], None] = indexed.put
        else:
            self.fleet = FleetView(workers=self._views)
            self._put_view = self._put_plain
        self._heap: list[tuple[float, int, int, object, int]] = []
        self._seq = 0
        self._now = 0.0
        self._reqs: dict[str, _Req] = {}
        self._pins: dict[str, tuple[str, float]] = {}
        # Prefix index: block hash -> bitmask of workers caching it (bit i = worker i). Bit
        # operations make the "leading blocks per worker" walk one AND per block.
        self._index: dict[int, int] = {}
        self._use_index = trace.shares_prefixes and caching
        self._hasher = PrefixHasher(block_size=self._workers[0].engine.block_size if workers else 16)
        self._dirty: list[_Worker] = []
        self._waiting_pins = 0
        self._arrivals_done = False
        label = policy.name + ("/no-pins" if cfg.ignore_pins else "")
        self.data = RunData(policy=label, workers=len(self._workers))
        self.data.prefill_tokens_by_worker = [0] * len(self._workers)
        self.data.gpu_count = len(self._workers)
        self._sum_used = sum(w.view.num_blocks_used for w in self._workers if w.view)
        self._sum_total = sum(w.engine.num_blocks for w in self._workers)
        self._sum_running = 0
        self._ticks = 0
        self._worker_every = 0

    @property
    def workers(self) -> list[_Worker]:
        return self._workers

    @property
    def total_blocks(self) -> int:
        return self._sum_total

    # -- the loop -------------------------------------------------------------------------

    def run(self) -> RunData:
        # The engines, trace and views built so far live as long as the run: moving them out of
        # the collector's generations keeps its full passes (triggered by allocation counts) from
        # walking millions of long-lived objects again and again. No effect on results.
        gc.freeze()
        try:
            return self._run()
        finally:
            gc.unfreeze()

    def _run(self) -> RunData:
        wall0 = time.perf_counter()
        cfg = self.config
        data = self.data
        if cfg.worker_samples > 0:
            ticks = max(1.0, self.trace.span_s / cfg.telemetry_interval_s)
            self._worker_every = max(1, int(ticks / cfg.worker_samples))
            data.series.worker_kv = [array("d") for _ in self._workers]
        heap = self._heap
        pop = heapq.heappop
        arrivals = iter(self._requests)
        nxt = next(arrivals, None)
        if nxt is not None:
            data.first_arrival_s = nxt.arrival_s
            self._push(nxt.arrival_s, _TICK, None, 0)
        else:
            self._arrivals_done = True
        events = 0
        last_report = wall0
        progress = self._progress
        while True:
            if heap and (nxt is None or heap[0][0] <= nxt.arrival_s):
                t, _, kind, a, b = pop(heap)
                self._now = t
                if kind == _DONE:
                    assert isinstance(a, _Worker)
                    if b == a.busy_gen:
                        self._done(a, t)
                elif kind == _DELIVER:
                    assert isinstance(a, _Req)
                    self._deliver(a, t)
                elif kind == _TICK:
                    self._tick(t)
                else:
                    assert isinstance(a, _Req)
                    self._pin_deadline(a, t)
            elif nxt is not None:
                self._now = nxt.arrival_s
                self._arrive(nxt)
                nxt = next(arrivals, None)
                if nxt is None:
                    self._arrivals_done = True
            else:
                break
            events += 1
            if progress is not None and not events & 0x3FF:
                wall = time.perf_counter()
                if wall - last_report >= 2.0:
                    last_report = wall
                    progress(self._now, data.requests)
        for w in self._workers:
            data.preemptions += w.engine.stats().preemptions_total
            data.prefill_tokens_by_worker[w.idx] = w.prefill
        data.wall_s = time.perf_counter() - wall0
        return data

    def _push(self, t: float, kind: int, a: object, b: int) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, a, b))

    # -- scheduler side -------------------------------------------------------------------

    def _arrive(self, tr: TraceRequest) -> None:
        data = self.data
        t = tr.arrival_s
        tier = tier_of(tr.session_id)
        data.requests += 1
        data.requests_by_tier[tier] = data.requests_by_tier.get(tier, 0) + 1
        req = _Req(tr, tier, tr.prompt_tokens + tr.output_tokens)
        hashes: list[int] = []
        hits: dict[str, int] = {}
        if self._use_index:
            hashes = self._hasher.request_hashes(tr)
            if hashes:
                hits = self._prefix_hits(hashes)
            req.hashes = hashes
            if self._bounds is not None:
                insert = self._hasher.cached_after(tr, True) if self.trace.answers_reused else hashes
                for bound in self._bounds:
                    bound.add(tr.prompt_tokens, hashes, insert)
        pinned: str | None = None
        pin = None if self.config.ignore_pins else self._pins.get(tr.session_id)
        if pin is not None:
            if t - pin[1] <= self.config.pin_idle_ttl_s:
                pinned = pin[0]
            else:
                del self._pins[tr.session_id]
        req.pinned = pinned
        preq = PlacementRequest(
            request_id=tr.request_id,
            session_id=tr.session_id,
            model=self.config.model,
            prompt_tokens=tr.prompt_tokens,
            max_new_tokens=tr.output_tokens,
            tier=tier,
            block_hashes=tuple(hashes),
            pinned_worker=pinned,
            prefix_hit_blocks=hits,
        )
        t0 = time.perf_counter()
        decision = self.policy.place(preq, self.fleet)
        data.place_s += time.perf_counter() - t0
        data.place_calls += 1
        if isinstance(decision, Shed):
            self._shed(req, decision.tier or tier, t)
            return
        req.candidates = decision.candidates
        if decision.wait_for_pinned and decision.candidates:
            if self._commit(req, decision.candidates[0], t):
                return
            # The servicer polls the pinned worker until it has room or the wait runs out; its
            # view changes only when telemetry does, so the simulator re-checks at ticks.
            w = self._by_id[decision.candidates[0]]
            req.pin_wait = True
            w.waiters.append(req)
            self._waiting_pins += 1
            wait = min(decision.expected_wait_s, self.config.max_pin_wait_s)
            self._push(t + wait, _PIN_DEADLINE, req, 0)
            return
        self._commit_any(req, decision.candidates, t)

    def _commit_any(self, req: _Req, candidates: Sequence[str], t: float) -> None:
        for wid in candidates:
            if self._commit(req, wid, t):
                return
        # Every candidate filled up between snapshot and commit (the servicer's answer).
        self._shed(req, req.tier, t)

    def _commit(self, req: _Req, wid: str, t: float) -> bool:
        """reserve.lua: reserve only if (telemetry free - reserved) covers the request."""
        w = self._by_id.get(wid)
        if w is None or w.view is None:
            return False
        need = req.need
        if w.view.free_tokens < need:
            return False
        w.reserved += need
        w.view = _derive_view(w.view, {"reserved_tokens": w.reserved})
        self._put_view(w.view)
        tr = req.trace
        self._pins[tr.session_id] = (wid, t)
        if req.pinned is None:
            outcome = "new"
        else:
            outcome = "pinned_hit" if req.pinned == wid else "moved"
        outcomes = self.data.outcomes
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        req.outcome = outcome
        req.worker = w.idx
        self._reqs[tr.request_id] = req
        self._push(t + self.config.placement_delay_s, _DELIVER, req, 0)
        return True

    def _shed(self, req: _Req, tier: str, t: float) -> None:
        data = self.data
        data.shed_by_tier[tier] = data.shed_by_tier.get(tier, 0) + 1
        data.shed_times.append(t)

    def _pin_deadline(self, req: _Req, t: float) -> None:
        if not req.pin_wait:
            return
        req.pin_wait = False
        self._waiting_pins -= 1
        self._by_id[req.candidates[0]].waiters.remove(req)
        self._commit_any(req, req.candidates[1:], t)

    def _prefix_hits(self, hashes: Sequence[int]) -> dict[str, int]:
        """Per worker, how many leading blocks of `hashes` its index entries cover (the live
        store.lookup's SMISMEMBER walk), from the bitmask index in one pass."""
        index = self._index
        cur = index.get(hashes[0], 0)
        if not cur:
            return {}
        hits: dict[str, int] = {}
        workers = self._workers
        n = len(hashes)
        i = 1
        while i < n:
            nxt = cur & index.get(hashes[i], 0)
            if nxt != cur:
                gone = cur & ~nxt
                while gone:
                    low = gone & -gone
                    hits[workers[low.bit_length() - 1].spec.worker_id] = i
                    gone ^= low
                cur = nxt
                if not cur:
                    return hits
            i += 1
        while cur:
            low = cur & -cur
            hits[workers[low.bit_length() - 1].spec.worker_id] = n
            cur ^= low
        return hits

    def _tick(self, t: float) -> None:
        """Telemetry: every worker whose engine changed publishes stats and KV events; the
        scheduler releases the reservations of requests its engine has now seen."""
        self._ticks += 1
        put = self._put_view
        for w in self._dirty:
            w.dirty = False
            if w.engine_dirty:
                w.engine_dirty = False
                w.stats = w.engine.stats()
                events = w.engine.take_kv_events()
                if self._use_index and events:
                    self._apply_kv_events(w, events.stored, events.removed, events.all_cleared)
            if w.delivered:
                delivered = w.delivered
                for request_id in w.stats.admitted_request_ids:
                    need = delivered.pop(request_id, 0)
                    w.reserved -= need
            old = w.view
            view = self._make_view(w)
            if old is not None:
                self._sum_used -= old.num_blocks_used
                self._sum_running -= old.running
            self._sum_used += view.num_blocks_used
            self._sum_running += view.running
            w.view = view
            put(view)
            if w.waiters:
                for req in list(w.waiters):
                    if self._commit(req, w.spec.worker_id, t):
                        req.pin_wait = False
                        self._waiting_pins -= 1
                        w.waiters.remove(req)
        self._dirty = []
        series = self.data.series
        series.t.append(t)
        series.kv_utilisation.append(self._sum_used / self._sum_total if self._sum_total else 0.0)
        series.batch.append(self._sum_running / len(self._workers) if self._workers else 0.0)
        if self._worker_every and self._ticks % self._worker_every == 0:
            series.worker_t.append(t)
            for w in self._workers:
                v = w.view
                series.worker_kv[w.idx].append(v.num_blocks_used / v.num_blocks_total if v else 0.0)
        if not self._arrivals_done or self._reqs or self._waiting_pins:
            self._push(t + self.config.telemetry_interval_s, _TICK, None, 0)

    def _apply_kv_events(self, w: _Worker, stored: list[int], removed: list[int], cleared: bool) -> None:
        index = self._index
        bit = w.bit
        keep = ~bit
        if cleared:
            for h in [h for h, v in index.items() if v & bit]:
                v = index[h] & keep
                if v:
                    index[h] = v
                else:
                    del index[h]
        get = index.get
        for h in stored:
            index[h] = get(h, 0) | bit
        for h in removed:
            v = get(h, 0) & keep
            if v:
                index[h] = v
            else:
                index.pop(h, None)

    def _put_plain(self, view: WorkerView) -> None:
        self._views[view.worker_id] = view

    def _make_view(self, w: _Worker) -> WorkerView:
        s = w.stats
        if w.view is not None:
            # Only the telemetry-derived fields change; see _new_view for the others.
            return _derive_view(
                w.view,
                {
                    "block_size": s.block_size,
                    "num_blocks_total": s.num_blocks_total,
                    "num_blocks_used": s.num_blocks_used,
                    "num_blocks_cached": s.num_blocks_cached,
                    "reserved_tokens": max(0, w.reserved),
                    "running": s.running,
                    "waiting": s.waiting,
                    "step_ms": s.step_ms,
                    "tokens_per_s": s.tokens_per_s,
                },
            )
        return self._new_view(w)

    def _new_view(self, w: _Worker) -> WorkerView:
        s = w.stats
        return WorkerView(
            worker_id=w.spec.worker_id,
            region=w.spec.region,
            model=self.config.model,
            state=WorkerState.READY,
            block_size=s.block_size,
            num_blocks_total=s.num_blocks_total,
            num_blocks_used=s.num_blocks_used,
            num_blocks_cached=s.num_blocks_cached,
            reserved_tokens=max(0, w.reserved),
            running=s.running,
            waiting=s.waiting,
            step_ms=s.step_ms,
            tokens_per_s=s.tokens_per_s,
            engine="sim",
            prefill_tokens_per_s=w.prefill_rate,
            max_num_seqs=self.config.max_num_seqs,
        )

    def _mark(self, w: _Worker) -> None:
        w.engine_dirty = True
        if not w.dirty:
            w.dirty = True
            self._dirty.append(w)

    # -- worker side ----------------------------------------------------------------------

    def _deliver(self, req: _Req, t: float) -> None:
        w = self._workers[req.worker]
        # The reservation goes once telemetry shows the request's prompt in the KV cache.
        w.delivered[req.trace.request_id] = req.need
        if w.mode == _PLANNED:
            self._cut_run(w, t)
        tr = req.trace
        self._mark(w)
        try:
            w.engine.add_request_hashed(
                tr.request_id, prompt_token_ids(tr), tr.output_tokens, tr.seed, req.hashes
            )
        except EngineError:
            self.data.rejected += 1
            del self._reqs[tr.request_id]
            self._release(w, tr.request_id)
            return
        if w.mode == _IDLE:
            self._plan(w, t)

    def _cut_run(self, w: _Worker, t: float) -> None:
        """A request arrives during a planned decode run: apply the steps done by now plus the
        one in flight (the engine admits the request at the step after it)."""
        engine = w.engine
        k = min(w.planned_k, 1 + engine.steps_within(t - w.run_start))
        end = w.run_start + engine.jump_seconds(k)
        self._apply_jump(w, engine.jump(k), k, end)
        w.busy_gen += 1
        w.mode = _BUSY
        self._push(max(end, t), _DONE, w, w.busy_gen)

    def _done(self, w: _Worker, t: float) -> None:
        if w.mode == _PLANNED:
            self._apply_jump(w, w.engine.jump(w.planned_k), w.planned_k, t)
        w.mode = _IDLE
        self._plan(w, t)

    def _plan(self, w: _Worker, t: float) -> None:
        engine = w.engine
        if not engine.has_unfinished():
            w.mode = _IDLE
            return
        k = engine.steps_until_event() if self.config.use_jumps else 0
        w.busy_gen += 1
        if k == 0:
            self._mark(w)
            out = engine.step()
            if out.num_scheduled_tokens == 0:
                # A step that only preempted schedules nothing and takes no time; the next one
                # runs what is left. Two in a row would mean nothing can ever run (add_request
                # rejects requests larger than the pool): stop rather than spin.
                out = engine.step()
                if out.num_scheduled_tokens == 0:
                    raise RuntimeError(f"worker {w.spec.worker_id} is stuck at t={t:.3f}")
            end = t + out.duration_s
            self._apply_step(w, out, end)
            w.mode = _BUSY
            self._push(end, _DONE, w, w.busy_gen)
            return
        w.mode = _PLANNED
        w.planned_k = k
        w.run_start = t
        self._push(t + engine.jump_seconds(k), _DONE, w, w.busy_gen)

    def _apply_step(self, w: _Worker, out: StepOutput, end: float) -> None:
        data = self.data
        reqs = self._reqs
        decode_tokens = 0
        for o in out.outputs:
            req = reqs[o.request_id]
            if req.first_s < 0.0:
                req.first_s = end
                data.ttft_s.append(end - req.arrival)
                by_outcome = data.ttft_by_outcome.get(req.outcome)
                if by_outcome is None:
                    by_outcome = data.ttft_by_outcome[req.outcome] = array("d")
                by_outcome.append(end - req.arrival)
                cached = o.num_cached_tokens
                data.prompt_tokens += o.num_prompt_tokens
                data.cached_tokens += cached
                w.prefill += o.num_prompt_tokens - cached
            else:
                decode_tokens += 1
            if o.finished:
                self._finish(req, o.request_id, end)
        if decode_tokens:
            data.itl.add(out.duration_s, decode_tokens)

    def _apply_jump(self, w: _Worker, out: JumpOutput, k: int, end: float) -> None:
        self._mark(w)
        engine = w.engine
        batch = out.num_scheduled_tokens // k
        self.data.itl.add(out.duration_s / k, batch * k)
        if engine.num_running < batch:
            reqs = self._reqs
            for o in out.outputs:
                if o.finished:
                    self._finish(reqs[o.request_id], o.request_id, end)

    def _release(self, w: _Worker, request_id: str) -> None:
        """The request ended: its reservation goes if telemetry has not released it yet (the
        gateway's Release), seen by placements from the next tick."""
        need = w.delivered.pop(request_id, 0)
        if need:
            w.reserved -= need
            if not w.dirty:
                w.dirty = True
                self._dirty.append(w)

    def _finish(self, req: _Req, request_id: str, end: float) -> None:
        if req.worker >= 0:
            self._release(self._workers[req.worker], request_id)
        data = self.data
        data.served += 1
        data.e2e_s.append(end - req.arrival)
        if end > data.last_finish_s:
            data.last_finish_s = end
        del self._reqs[request_id]
