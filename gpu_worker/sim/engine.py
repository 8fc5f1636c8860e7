"""SimEngine: a pure state machine of vLLM V1's scheduler loop (vllm/v1/core/sched/scheduler.py).

One `step()` is one engine iteration: schedule running requests (decodes and ongoing
prefill chunks) under a token budget, admit waiting requests FCFS with prefix-cache lookup,
preempt by recompute when blocks run out, price the batch with the roofline model and
emit the sampled tokens. No clock is read here: callers advance wall or virtual time by
`duration_s`.

Cost discipline: a pure-decode step or jump does work only for the requests that need a new
KV block or finish (a decode clock advances the others' counters, see SimEngine.__init__,
and decode outputs are derived from it when read); anything else is O(batch). Per-token work
happens only when a caller asks for token ids and when block hashes are needed (the pool
computes them lazily: for a prefix lookup that can hit, a registration that can duplicate,
or the KV events; see block_pool).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from heapq import heapify, heappop, heappush

from gpu_worker.engine import EngineError, EngineStats, KvEventBatch
from gpu_worker.sim.block_pool import BlockPool, block_hashes
from gpu_worker.sim.profiles import get_gpu, get_model
from gpu_worker.sim.roofline import (
    DecodePricer,
    StepCost,
    check_tp,
    kv_capacity_blocks,
    step_cost,
)
from gpu_worker.sim.tokenizer import SimTokenizer

# Weight of the newest step in the step-time/throughput moving averages.
_EWMA_ALPHA = 0.1


@dataclass(frozen=True)
class EngineConfig:
    gpu: str
    model: str
    tp: int = 1
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_prefix_caching: bool = True
    num_gpu_blocks_override: int | None = None
    max_model_len: int | None = None


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    # Empty when the caller skipped token ids (jump(collect_tokens=False)); see num_new_tokens.
    new_token_ids: list[int]
    num_new_tokens: int
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    finished: bool = False
    finish_reason: str = ""


class _Epoch:
    """A stretch of decode-clock time in which no running request's output base
    (num_output - t0) changes off the clock. Lazy outputs of that stretch read the bases when
    materialised; the engine freezes them here (`bases`) before anything changes them."""

    __slots__ = ("bases", "used")

    def __init__(self) -> None:
        self.bases: dict[_Request, int] | None = None
        self.used = False

    def base(self, req: _Request) -> int:
        bases = self.bases
        if bases is not None:
            b = bases.get(req)
            if b is not None:
                return b
        # Not running when the epoch closed: finished or aborted, so unchanged since.
        return req.num_output - req.t0


class _LazyOutputs:
    """Per-request outputs built on first access of `outputs`.

    A decode step (or a k-step jump) records only which requests advanced, the clock after
    the step and its epoch, which give each request's output count (base + clock); the
    RequestOutput objects (and token ids) are derived from that on demand. Everything they
    are derived from (id, seed, prompt length, cached tokens, limit) is fixed once a request
    is admitted, so late materialisation yields the same values.
    """

    __slots__ = ("_clock", "_epoch", "_k", "_outputs", "_reqs", "_tail", "_tokenizer", "_with_ids")

    def _init_lazy(
        self,
        outputs: list[RequestOutput] | None,
        reqs: list[_Request] | None = None,
        epoch: _Epoch | None = None,
        k: int = 1,
        with_ids: bool = True,
        tail: list[tuple[_Request, int]] | None = None,
        tokenizer: SimTokenizer | None = None,
        clock: int = 0,
    ) -> None:
        self._outputs = outputs
        self._reqs = reqs
        self._epoch = epoch
        self._clock = clock
        self._k = k
        self._with_ids = with_ids
        self._tail = tail
        self._tokenizer = tokenizer

    @property
    def outputs(self) -> list[RequestOutput]:
        out = self._outputs
        if out is None:
            reqs = self._reqs or []
            epoch, clock = self._epoch, self._clock
            if epoch is None:
                counts = []
            elif epoch.bases is None:
                counts = [r.num_output - r.t0 + clock for r in reqs]
            else:
                counts = [epoch.base(r) + clock for r in reqs]
            out = _decode_outputs(reqs, counts, self._k, self._with_ids, self._tokenizer)
            if self._tail and self._tokenizer:
                out += _sampled_outputs(self._tail, self._tokenizer)
            self._outputs = out
            self._reqs = self._tail = None
            self._epoch = None
        return out


_new_object = object.__new__
_set_attr = object.__setattr__


def _fast_output(
    request_id: str, ids: list[int], k: int, n_prompt: int, n_cached: int, n_out: int, finished: bool
) -> RequestOutput:
    """RequestOutput(...) at half the cost of the frozen dataclass __init__ (one attribute store
    instead of eight object.__setattr__ calls); test_sim_engine checks they compare equal."""
    out: RequestOutput = _new_object(RequestOutput)
    _set_attr(
        out,
        "__dict__",
        {
            "request_id": request_id,
            "new_token_ids": ids,
            "num_new_tokens": k,
            "num_prompt_tokens": n_prompt,
            "num_cached_tokens": n_cached,
            "num_output_tokens": n_out,
            "finished": finished,
            "finish_reason": "length" if finished else "",
        },
    )
    return out


def _sampled_outputs(sampled: Iterable[tuple[_Request, int]], tokenizer: SimTokenizer) -> list[RequestOutput]:
    """Outputs of requests that sampled one token, the n-th, in a step (prefills reaching the
    end of their prompt, or a one-step decode)."""
    sample = tokenizer.sample
    return [
        _fast_output(
            r.request_id,
            [sample(r.seed, n - 1)],
            1,
            r.n_prompt,
            r.num_cached_tokens,
            n,
            n >= r.max_new_tokens,
        )
        for r, n in sampled
    ]


def _decode_outputs(
    reqs: list[_Request], counts: list[int], k: int, with_ids: bool, tokenizer: SimTokenizer | None
) -> list[RequestOutput]:
    if not with_ids or tokenizer is None:
        return [
            _fast_output(r.request_id, [], k, r.n_prompt, r.num_cached_tokens, n, n >= r.max_new_tokens)
            for r, n in zip(reqs, counts, strict=True)
        ]
    if k == 1:
        return _sampled_outputs(zip(reqs, counts, strict=True), tokenizer)
    many = tokenizer.sample_many
    return [
        _fast_output(
            r.request_id, many(r.seed, n - k, k), k, r.n_prompt, r.num_cached_tokens, n, n >= r.max_new_tokens
        )
        for r, n in zip(reqs, counts, strict=True)
    ]


class StepOutput(_LazyOutputs):
    """One engine step: its duration, the tokens it sampled (`outputs`, in schedule order)."""

    __slots__ = ("arithmetic_intensity", "duration_s", "num_preempted", "num_scheduled_tokens")

    def __init__(
        self,
        duration_s: float,
        outputs: list[RequestOutput] | None,
        num_scheduled_tokens: int,
        arithmetic_intensity: float,
        num_preempted: int = 0,
    ) -> None:
        self.duration_s = duration_s
        self.num_scheduled_tokens = num_scheduled_tokens
        self.arithmetic_intensity = arithmetic_intensity
        self.num_preempted = num_preempted
        self._init_lazy(outputs if outputs is not None else [])

    def __repr__(self) -> str:
        return (
            f"StepOutput(duration_s={self.duration_s!r}, outputs={self.outputs!r}, "
            f"num_scheduled_tokens={self.num_scheduled_tokens!r}, "
            f"arithmetic_intensity={self.arithmetic_intensity!r}, num_preempted={self.num_preempted!r})"
        )


class JumpOutput(_LazyOutputs):
    """k pure-decode steps at once; `outputs` has one entry per request with k new tokens."""

    __slots__ = ("arithmetic_intensity", "duration_s", "num_scheduled_tokens", "num_steps")

    def __init__(
        self,
        num_steps: int,
        duration_s: float,
        outputs: list[RequestOutput] | None,
        num_scheduled_tokens: int,
        arithmetic_intensity: float,
    ) -> None:
        self.num_steps = num_steps
        self.duration_s = duration_s
        self.num_scheduled_tokens = num_scheduled_tokens
        # Aggregate FLOPs / bytes over the k steps.
        self.arithmetic_intensity = arithmetic_intensity
        self._init_lazy(outputs if outputs is not None else [])

    def __repr__(self) -> str:
        return (
            f"JumpOutput(num_steps={self.num_steps!r}, duration_s={self.duration_s!r}, "
            f"outputs={self.outputs!r}, num_scheduled_tokens={self.num_scheduled_tokens!r}, "
            f"arithmetic_intensity={self.arithmetic_intensity!r})"
        )


# The blocks of every request that holds none (waiting or done): shared, never mutated (a
# request is given a list of its own when admitted), so that finished requests the KV events
# still refer to keep no list each for the cyclic GC to track.
_NO_BLOCKS: list[int] = []


class _Request:
    __slots__ = (
        "blocks",
        "hashes",
        "max_new_tokens",
        "n_prompt",
        "num_cached_blocks",
        "num_cached_tokens",
        "num_computed",
        "num_output",
        "order",
        "prompt",
        "prompt_base",
        "request_id",
        "seed",
        "t0",
    )

    def __init__(
        self, request_id: str, prompt: Sequence[int], max_new_tokens: int, seed: int, hashes: list[int]
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        # Tokens dropped from the front of `prompt` once their block hashes are known.
        self.prompt_base = 0
        self.n_prompt = len(prompt)
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        # Chained hashes of full blocks of prompt + output known so far (prefix of the sequence).
        self.hashes = hashes
        self.num_output = 0
        # Tokens whose KV is in the cache; the newest sampled token is never computed yet.
        self.num_computed = 0
        self.blocks = _NO_BLOCKS
        # Leading entries of `blocks` already registered in (or taken from) the prefix cache.
        self.num_cached_blocks = 0
        self.num_cached_tokens = -1  # set at first admission
        # While running, num_computed and num_output are their values at engine clock t0 (each
        # tick since decoded one token); `order` is its rank in the running batch (admission
        # count), which orders the clock's heaps like the batch.
        self.t0 = 0
        self.order = 0

    @property
    def num_tokens(self) -> int:
        return self.n_prompt + self.num_output


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class _SeqHasher:
    """The pool's hasher: a request's chained block hashes, computed up to at least n_blocks.

    An object of its own rather than a bound method of the engine, so the pool holds no
    reference back to the engine: without that cycle a dropped engine is freed at once
    instead of being left, whole, to the cyclic GC (a full collection of one finished busy
    worker took 0.2 s, charged to whatever ran next)."""

    __slots__ = ("block_size", "tokenizer")

    def __init__(self, block_size: int, tokenizer: SimTokenizer) -> None:
        self.block_size = block_size
        self.tokenizer = tokenizer

    def __call__(self, req: _Request, n_blocks: int) -> list[int]:
        hashes = req.hashes
        have = len(hashes)
        if have >= n_blocks:
            return hashes
        bs = self.block_size
        lo, hi = have * bs, n_blocks * bs
        n_prompt = req.n_prompt
        base = req.prompt_base
        tokens: Sequence[int] = req.prompt[lo - base : hi - base]
        if hi > n_prompt:
            start = max(lo - n_prompt, 0)
            tokens = [*tokens, *self.tokenizer.sample_many(req.seed, start, hi - n_prompt - start)]
        hashes += block_hashes(tokens, bs, hashes[-1] if hashes else None)
        return hashes


class SimEngine:
    kind = "sim"

    def __init__(self, config: EngineConfig, tokenizer: SimTokenizer | None = None) -> None:
        if config.block_size < 1 or config.max_num_seqs < 1 or config.max_num_batched_tokens < 1:
            raise ValueError("block_size, max_num_seqs and max_num_batched_tokens must be >= 1")
        self.config = config
        self.gpu = get_gpu(config.gpu)
        self.model_profile = get_model(config.model)
        check_tp(self.model_profile, config.tp)
        self.model = config.model
        self.block_size = config.block_size
        self.max_model_len = config.max_model_len or self.model_profile.max_model_len
        if config.num_gpu_blocks_override is not None:
            self.num_blocks = config.num_gpu_blocks_override
        else:
            self.num_blocks = kv_capacity_blocks(
                self.gpu, self.model_profile, config.tp, config.gpu_memory_utilization, config.block_size
            )
        self._pricer = DecodePricer(self.gpu, self.model_profile, config.tp)
        self.tokenizer = tokenizer or SimTokenizer()
        self.pool = BlockPool(
            self.num_blocks, config.enable_prefix_caching, _SeqHasher(self.block_size, self.tokenizer)
        )
        self._caching = config.enable_prefix_caching
        self._requests: dict[str, _Request] = {}
        self._running: list[_Request] = []
        self._waiting: deque[_Request] = deque()
        self._preemptions = 0
        self._prompt_tokens_queried = 0
        self._prompt_tokens_hit = 0
        self._ewma_step_s = 0.0
        self._ewma_tokens = 0.0
        self._last_intensity = 0.0
        self._steps = 0
        # Whether every running request is decoding (its newest token is the only one not
        # computed) and, when it is, the attended-context sum of that decode batch,
        # sum(num_computed + 1). Both are kept up to date by the decode paths (step fast
        # path, jump) and recomputed lazily (_decode_state) after anything else.
        self._decode_known = True
        self._decode_only = True
        self._ctx_sum = 0
        # Bumped on every state change; steps_until_event() is cached against it.
        self._version = 0
        self._event_cache = (-1, 0)
        # Decode clock: a decode step (fast path or jump) advances `_clock` instead of every
        # running request's counters (see _Request.t0). A decoding request's blocks cover its
        # computed tokens with less than a block to spare, so it needs a new block at the
        # ticks t with t = g (mod block_size) for a fixed g: `_grow[g]` holds those requests
        # (in schedule order), and a heap of (clock value, order, request) says when each
        # finishes. So a decode step costs O(requests growing or finishing), not O(batch).
        # Valid while `_heaps_ok`: anything that changes counters off the clock (general step,
        # abort) clears it.
        self._clock = 0
        self._admissions = 0
        self._grow: list[dict[_Request, None]] = []
        # Blocks allocated for decode growth and not yet appended to their requests' `blocks`:
        # block ids are labels nothing observes, so a request takes its due count from here
        # when it leaves the clock (_sync) instead of every growth touching it.
        self._grown: list[int] = []
        self._finish_heap: list[tuple[int, int, _Request]] = []
        self._heaps_ok = False
        self._epoch = _Epoch()

    # -- requests -------------------------------------------------------------------

    def add_request(
        self, request_id: str, prompt_token_ids: Sequence[int], max_new_tokens: int, seed: int = 0
    ) -> None:
        if request_id in self._requests:
            raise EngineError(f"duplicate request id {request_id!r}")
        if len(prompt_token_ids) == 0:
            raise EngineError(f"request {request_id!r} has an empty prompt")
        if max_new_tokens < 1:
            raise EngineError(f"request {request_id!r}: max_new_tokens must be >= 1, got {max_new_tokens}")
        total = len(prompt_token_ids) + max_new_tokens
        if total > self.max_model_len:
            raise EngineError(
                f"request {request_id!r}: prompt ({len(prompt_token_ids)} tokens) + max_new_tokens "
                f"({max_new_tokens}) = {total} exceeds max_model_len {self.max_model_len}"
            )
        if _cdiv(total, self.block_size) > self.num_blocks:
            raise EngineError(
                f"request {request_id!r} needs {_cdiv(total, self.block_size)} KV blocks, "
                f"the engine has {self.num_blocks}"
            )
        # A range is immutable: kept as it is (a copy of a long prompt cost as much as the rest of
        # add_request); anything else is copied, the caller may reuse its list.
        prompt = prompt_token_ids if type(prompt_token_ids) is range else list(prompt_token_ids)
        req = _Request(request_id, prompt, max_new_tokens, seed, [])
        self._requests[request_id] = req
        self._waiting.append(req)
        self._version += 1

    def abort(self, request_id: str) -> bool:
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        self._version += 1
        if req.blocks:
            self._sync(req)
            self._running.remove(req)
            self._release(req)
            self._decode_known = False
            self._heaps_ok = False
        else:
            self._waiting.remove(req)
        return True

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    # -- block bookkeeping ------------------------------------------------------------

    def _cache_computed_blocks(self, req: _Request) -> None:
        """Register req's full, computed blocks in the prefix cache.

        Called after prefill chunks and when a request leaves the batch, not after decode
        steps: a generated block can only be hit by a prompt that contains this request's
        unfinished answer, so deferring its registration until the request ends changes no
        cache hit while keeping decode (and jump) free of per-block work. The visible effect
        is that "stored" KV events for generated blocks arrive when the request ends.
        """
        if not self._caching:
            return
        target = min(req.num_computed // self.block_size, len(req.blocks))
        if target <= req.num_cached_blocks:
            return
        self.pool.cache_seq_blocks(req, req.blocks, req.num_cached_blocks, target)
        req.num_cached_blocks = target

    def _release(self, req: _Request) -> None:
        self._cache_computed_blocks(req)
        # Tail first: the end of a sequence is the least likely to be shared, so evict it first.
        self.pool.release(req, req.blocks)
        req.blocks = _NO_BLOCKS
        req.num_cached_blocks = 0
        req.num_computed = 0

    def _preempt(self, req: _Request) -> None:
        self._release(req)
        self._waiting.appendleft(req)
        self._preemptions += 1

    def _plan_admission(self, req: _Request, budget: int) -> tuple[list[int], int, int] | None:
        """(cache-hit blocks, tokens to schedule, new blocks to allocate) or None if it does not fit."""
        bs = self.block_size
        hits: list[int] = []
        if self._caching:
            # Never a full-prompt hit: the last token is recomputed to produce logits.
            hits = self.pool.lookup_seq(req, (req.num_tokens - 1) // bs)
        cached = len(hits) * bs
        n = min(req.num_tokens - cached, budget)
        new_blocks = _cdiv(cached + n, bs) - len(hits)
        if new_blocks + (self.pool.num_evictable_among(hits) if hits else 0) > self.pool.num_free:
            return None
        return hits, n, new_blocks

    # -- stepping ---------------------------------------------------------------------

    def _sync(self, req: _Request) -> None:
        """Bring a running request's counters up to the clock and hand it the blocks it grew
        by meanwhile (its blocks cover its computed tokens)."""
        d = self._clock - req.t0
        if d:
            c = req.num_computed = req.num_computed + d
            req.num_output += d
            req.t0 = self._clock
            owed = -(-c // self.block_size) - len(req.blocks)
            if owed > 0:
                grown = self._grown
                req.blocks += grown[-owed:]
                del grown[-owed:]

    def _sync_running(self) -> None:
        for r in self._running:
            self._sync(r)
        if self._grown:
            raise EngineError(f"{len(self._grown)} blocks grown on the clock are owned by no request")

    def _build_heaps(self) -> None:
        """The clock's heaps for a running batch that only decodes."""
        self._sync_running()
        t = self._clock
        bs = self.block_size
        running = self._running
        self._finish_heap = [(t + r.max_new_tokens - r.num_output, r.order, r) for r in running]
        heapify(self._finish_heap)
        grow: list[dict[_Request, None]] = [{} for _ in range(bs)]
        for r in running:
            spare = len(r.blocks) * bs - r.num_computed
            if not 0 <= spare < bs:
                raise EngineError(
                    f"request {r.request_id!r}: {len(r.blocks)} blocks for {r.num_computed} tokens"
                )
            grow[(t + spare) % bs][r] = None
        self._grow = grow
        self._heaps_ok = True

    def _clock_out(self, r: _Request) -> None:
        """Take a finishing request off the clock (counters synced, blocks still held)."""
        bs = self.block_size
        self._grow[(self._clock - r.num_computed) % bs].pop(r)

    def _clock_in(self, admitted: list[tuple[_Request, int]]) -> None:
        """Put the requests admitted by a decode step that now decode on the clock."""
        t = self._clock
        bs = self.block_size
        for r, _ in admitted:
            if r.blocks and r.num_computed == r.n_prompt + r.num_output - 1:
                heappush(self._finish_heap, (t + r.max_new_tokens - r.num_output, r.order, r))
                self._grow[(t - r.num_computed) % bs][r] = None

    def _decode_state(self) -> bool:
        """True when every running request is decoding; refreshes _ctx_sum when unknown."""
        if not self._decode_known:
            self._sync_running()
            running = self._running
            self._decode_only = all(r.num_computed == r.n_prompt + r.num_output - 1 for r in running)
            self._ctx_sum = sum(r.num_computed for r in running) + len(running)
            self._decode_known = True
        return self._decode_only

    def step(self) -> StepOutput:
        self._version += 1
        batch = len(self._running)
        # Pure decode of the running batch (admissions may follow): every request needs one
        # token of budget and at most one new block, so nothing can be preempted.
        if (
            batch
            and batch <= self.config.max_num_batched_tokens
            and batch <= self.pool.num_free
            and self._decode_state()
        ):
            return self._decode_step()
        return self._general_step()

    def _decode_step(self) -> StepOutput:
        """step() when all running requests decode: the same schedule, allocations, pricing and
        outputs as _general_step, with work only for the requests that need a block or finish
        (the clock advances everyone else) and the context sum kept incrementally."""
        cfg = self.config
        pool = self.pool
        running = self._running
        batch = len(running)
        if not self._heaps_ok:
            self._build_heaps()
        t = self._clock
        t1 = self._clock = t + 1
        growing = self._grow[t % self.block_size]
        if growing:
            # One allocation for the requests whose token at this tick opens a new block (the
            # blocks they would take allocating in turn), owed to them until they sync.
            self._grown += pool.allocate(len(growing))
        fin = self._finish_heap
        finished: list[_Request] = []
        while fin and fin[0][0] == t1:
            finished.append(heappop(fin)[2])
        decoders = running[:]
        ctx = self._ctx_sum

        budget = cfg.max_num_batched_tokens - batch
        admitted: list[tuple[_Request, int]] = []
        if self._waiting and batch < cfg.max_num_seqs and budget > 0:
            budget = self._admit(admitted, budget)

        if admitted:
            cost = self._price(admitted, ctx, batch)
        else:
            cost = step_cost(
                self.gpu, self.model_profile, cfg.tp, ctx, batch, 0, 0, prefill_attention_pairs=0.0
            )
        ctx += batch
        for r in finished:
            self._sync(r)
            self._clock_out(r)
            ctx -= r.num_computed + 1
            self._finish(r)
        self._ctx_sum = ctx
        tail: list[tuple[_Request, int]] | None = None
        any_finished = bool(finished)
        if admitted:
            tail = []
            any_finished |= self._apply(admitted, tail)
            # _apply leaves the decode state unknown when a chunk stops short of the prompt end.
            self._clock_in(admitted)
        if any_finished:
            self._running = [r for r in running if r.blocks]
        num_outputs = batch + (len(tail) if tail else 0)
        self._record(cost.seconds, num_outputs, cost.arithmetic_intensity, 1)
        out = StepOutput(cost.seconds, None, cfg.max_num_batched_tokens - budget, cost.arithmetic_intensity)
        epoch = self._epoch
        epoch.used = True
        out._init_lazy(None, decoders, epoch, 1, True, tail, self.tokenizer, t1)
        return out

    def _admit(self, scheduled: list[tuple[_Request, int]], budget: int) -> int:
        """Admit waiting requests FCFS while they fit; append (req, tokens) to scheduled and
        return the budget left."""
        cfg = self.config
        pool = self.pool
        running = self._running
        waiting = self._waiting
        while waiting and len(running) < cfg.max_num_seqs and budget > 0:
            req = waiting[0]
            plan = self._plan_admission(req, budget)
            if plan is None:
                break
            hits, n, new_blocks = plan
            waiting.popleft()
            req.order = self._admissions
            self._admissions += 1
            req.t0 = self._clock
            pool.touch(hits)
            req.blocks = hits + pool.allocate(new_blocks)
            req.num_cached_blocks = len(hits)
            req.num_computed = len(hits) * self.block_size
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = req.num_computed
                self._prompt_tokens_queried += req.n_prompt
                self._prompt_tokens_hit += req.num_computed
            running.append(req)
            scheduled.append((req, n))
            budget -= n
        return budget

    def _apply(self, scheduled: list[tuple[_Request, int]], sampled: list[tuple[_Request, int]]) -> bool:
        """Advance scheduled requests by their tokens, sample where a request reaches its end
        (appending (request, its output count) to sampled), finish those at their limit. Keeps
        _ctx_sum/_decode_only exact when they were known and every scheduled request was a
        prefill admission; returns whether any finished."""
        any_finished = False
        for req, n in scheduled:
            was_prefill = not (n == 1 and req.num_computed == req.num_tokens - 1)
            req.num_computed += n
            if was_prefill:
                self._cache_computed_blocks(req)
            if req.num_computed < req.num_tokens:
                # A prefill chunk that does not reach the end samples nothing. One that stops
                # one token short leaves a request the decode path can finish like any other.
                if req.num_computed == req.num_tokens - 1:
                    self._ctx_sum += req.num_computed + 1
                else:
                    self._decode_only = False
                continue
            req.num_output += 1
            finished = req.num_output >= req.max_new_tokens
            sampled.append((req, req.num_output))
            if finished:
                any_finished = True
                self._finish(req)
            else:
                self._ctx_sum += req.num_computed + 1
        return any_finished

    def _general_step(self) -> StepOutput:
        if self._epoch.used:
            # This step changes output bases off the clock: freeze those the lazy outputs of
            # the epoch may still need.
            self._epoch.bases = {r: r.num_output - r.t0 for r in self._running}
            self._epoch = _Epoch()
        self._sync_running()
        self._heaps_ok = False
        cfg = self.config
        pool = self.pool
        budget = cfg.max_num_batched_tokens
        running = self._running
        scheduled: list[tuple[_Request, int]] = []
        preempted = 0

        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            n = min(req.num_tokens - req.num_computed, budget)
            need = _cdiv(req.num_computed + n, self.block_size) - len(req.blocks)
            self_preempted = False
            while need > pool.num_free:
                # Recompute preemption of the newest running request (vLLM V1 FCFS policy).
                victim = running.pop()
                self._preempt(victim)
                preempted += 1
                if victim is req:
                    self_preempted = True
                    break
            if self_preempted:
                break
            if need > 0:
                req.blocks.extend(pool.allocate(need))
            scheduled.append((req, n))
            budget -= n
            i += 1

        if preempted == 0 and self._waiting:
            budget = self._admit(scheduled, budget)
        self._decode_known = False

        if not scheduled:
            return StepOutput(0.0, [], 0, 0.0, preempted)

        cost = self._price(scheduled)
        sampled: list[tuple[_Request, int]] = []
        if self._apply(scheduled, sampled):
            self._running = [r for r in running if r.blocks]

        num_scheduled = cfg.max_num_batched_tokens - budget
        self._record(cost.seconds, len(sampled), cost.arithmetic_intensity, 1)
        out = StepOutput(cost.seconds, None, num_scheduled, cost.arithmetic_intensity, preempted)
        out._init_lazy(None, None, None, 1, True, sampled, self.tokenizer)
        return out

    def _price(
        self, scheduled: list[tuple[_Request, int]], decode_ctx: int = 0, num_decode: int = 0
    ) -> StepCost:
        prefill_new = 0
        prefill_ctx = 0
        pairs = 0.0
        for req, n in scheduled:
            c = req.num_computed
            if n == 1 and c == req.num_tokens - 1:
                decode_ctx += c + 1
                num_decode += 1
            else:
                prefill_new += n
                prefill_ctx += c
                pairs += n * (c + (n + 1) / 2)
        return step_cost(
            self.gpu,
            self.model_profile,
            self.config.tp,
            decode_ctx,
            num_decode,
            prefill_new,
            prefill_ctx,
            prefill_attention_pairs=pairs,
        )

    def _finish(self, req: _Request) -> None:
        self._release(req)
        del self._requests[req.request_id]
        # Lazily cached blocks keep the request until they are hashed or evicted; of its prompt
        # they need only the tokens after the hashed blocks (a range costs nothing to keep).
        base = min(len(req.hashes), req.n_prompt // self.block_size) * self.block_size
        if base > req.prompt_base and type(req.prompt) is not range:
            req.prompt = req.prompt[base - req.prompt_base :]
            req.prompt_base = base

    def _record(self, step_s: float, tokens_per_step: float, intensity: float, k: int) -> None:
        """Fold k steps of (mean) duration step_s into the EWMAs: exact for k identical steps."""
        if self._steps == 0:
            self._ewma_step_s, self._ewma_tokens = step_s, tokens_per_step
        else:
            keep = (1.0 - _EWMA_ALPHA) ** k
            self._ewma_step_s = step_s + (self._ewma_step_s - step_s) * keep
            self._ewma_tokens = tokens_per_step + (self._ewma_tokens - tokens_per_step) * keep
        self._last_intensity = intensity
        self._steps += k

    # -- multi-step jump --------------------------------------------------------------

    def _extra_blocks(self, k: int) -> int:
        """Blocks the running batch needs for k more decode steps (heaps valid)."""
        bs = self.block_size
        t = self._clock
        end = t + k
        total = 0
        for j, grow in enumerate(self._grow):
            g = t + (j - t) % bs  # the first tick at which these requests grow
            if grow and g < end:
                total += ((end - 1 - g) // bs + 1) * len(grow)
        return total

    def steps_until_event(self) -> int:
        """Pure-decode steps that can run before anything changes the batch: a request
        finishing (the last of these steps may finish some), the pool running out of blocks
        (which would preempt), or a waiting request becoming admissible. 0 means call step()."""
        version, cached = self._event_cache
        if version == self._version:
            return cached
        k = self._steps_until_event()
        self._event_cache = (self._version, k)
        return k

    def _steps_until_event(self) -> int:
        running = self._running
        cfg = self.config
        batch = len(running)
        if batch == 0 or batch > cfg.max_num_batched_tokens:
            return 0
        if not self._decode_state():
            return 0  # something is still prefilling
        if not self._heaps_ok:
            self._build_heaps()
        k_finish = self._finish_heap[0][0] - self._clock
        if self._waiting and batch < cfg.max_num_seqs:
            budget_left = cfg.max_num_batched_tokens - batch
            # Decode allocations only shrink the free pool (and may evict the head's cache
            # hits), so an admission that fails now keeps failing during the run.
            if budget_left > 0 and self._plan_admission(self._waiting[0], budget_left) is not None:
                return 0
        free = self.pool.num_free
        # A request needs at most ceil(k / block_size) new blocks in k steps; usually that bound
        # already fits and the exact count is not needed.
        if batch * _cdiv(k_finish, self.block_size) <= free or self._extra_blocks(k_finish) <= free:
            return k_finish
        lo, hi = 0, k_finish  # extra(lo) <= free < extra(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self._extra_blocks(mid) <= free:
                lo = mid
            else:
                hi = mid
        return lo

    def steps_within(self, seconds: float) -> int:
        """How many pure-decode steps of the current batch fit in `seconds` of engine time:
        the largest n whose total duration (as jump(n) would price it) is <= seconds.

        It ignores events, so cap it with steps_until_event(): a driver that must react to an
        arrival at time t runs min(steps_until_event(), 1 + steps_within(t - now)) steps (the
        last one is the step in flight when the request arrives). 0 when nothing decodes."""
        running = self._running
        if not running or seconds <= 0 or not self._decode_state():
            return 0
        return self._pricer.run(len(running), self._ctx_sum).steps_within(seconds)

    def jump(self, k: int, collect_tokens: bool = False) -> JumpOutput:
        """Advance k pure-decode steps at once; equivalent to k step() calls (same tokens,
        block counts and, to float rounding, duration) in O(batch); token ids are derived
        only if collect_tokens and `outputs` is read."""
        limit = self.steps_until_event()
        if not 1 <= k <= limit:
            raise ValueError(f"jump({k}) not possible: {limit} pure-decode steps available")
        self._version += 1
        running = self._running
        batch = len(running)
        bs = self.block_size
        ctx = self._ctx_sum
        cost = self._pricer.run(batch, ctx).cost(k)
        t = self._clock
        end = self._clock = t + k
        total = 0
        for j, grow in enumerate(self._grow):
            g = t + (j - t) % bs
            if grow and g < end:
                total += ((end - 1 - g) // bs + 1) * len(grow)
        if total:
            # One allocation for all the growth, owed to the requests until they sync. (k single
            # steps interleave the requests' allocations step by step: the same blocks leave the
            # queue, evicting the same hashes in the same order; only which request holds which
            # block id differs, which nothing observes.)
            self._grown += self.pool.allocate(total)
        fin = self._finish_heap
        finished: list[_Request] = []
        while fin and fin[0][0] <= end:
            finished.append(heappop(fin)[2])
        reqs = running[:]
        # As with k single steps, requests finish only in the last step, after all allocations.
        ctx += batch * k
        for r in finished:
            self._sync(r)
            self._clock_out(r)
            ctx -= r.num_computed + 1
            self._finish(r)
        self._ctx_sum = ctx
        if finished:
            self._running = [r for r in running if r.blocks]
        self._record(cost.seconds / k, batch, cost.arithmetic_intensity, k)
        out = JumpOutput(k, cost.seconds, None, batch * k, cost.arithmetic_intensity)
        epoch = self._epoch
        epoch.used = True
        out._init_lazy(None, reqs, epoch, k, collect_tokens, None, self.tokenizer, end)
        return out

    # -- observability ----------------------------------------------------------------

    def stats(self) -> EngineStats:
        pool = self.pool
        queried = self._prompt_tokens_queried
        step_s = self._ewma_step_s
        return EngineStats(
            block_size=self.block_size,
            num_blocks_total=self.num_blocks,
            num_blocks_used=pool.num_used,
            num_blocks_cached=pool.num_cached_unreferenced,
            running=len(self._running),
            waiting=len(self._waiting),
            preemptions_total=self._preemptions,
            step_ms=step_s * 1e3,
            # Generated (output) tokens per second of engine time.
            tokens_per_s=self._ewma_tokens / step_s if step_s > 0 else 0.0,
            arithmetic_intensity=self._last_intensity,
            prefix_hit_rate=self._prompt_tokens_hit / queried if queried else 0.0,
            # Requests whose prompt KV is allocated (a running request's counters may be those
            # at its clock t0, when it was decoding already): the scheduler drops their
            # reservations. A waiting request, or one part-way through a chunked prefill, still
            # needs its reservation: its KV is not in num_blocks_used yet. One token short of
            # the prompt counts: the decode path computes that token.
            admitted_request_ids=tuple(
                r.request_id for r in self._running if r.num_computed + 1 >= r.n_prompt
            ),
        )

    def take_kv_events(self) -> KvEventBatch:
        return self.pool.take_events()
