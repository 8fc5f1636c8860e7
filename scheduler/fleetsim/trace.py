"""Traces the fleet simulator replays: loaders, rate scaling and token materialisation.

Pure and deterministic: no I/O beyond reading the trace file, no clocks, no global random state.

A request's prompt is not stored as token ids (a million Azure requests of ~1k tokens, or the
Mooncake trace's 15k-token prompts, would not fit in memory): it is a tuple of *segments*, each a
recipe for a run of token ids, materialised only when the request reaches a worker:

- ``(RANGE, start, n)``: the ids ``start .. start+n-1``. Disjoint ranges never share a KV block;
  equal ranges at equal positions do (Mooncake hash ids, shared system prompts).
- ``(ANSWER, seed, n)``: the first n tokens the simulated engine samples for a request with this
  seed (``SimTokenizer.sample_many``), i.e. a previous turn's answer, so the next turn of a chat
  hits the prefix cache on it exactly as a live conversation does.
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import heapq
import json
import math
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from gpu_worker.sim.block_pool import block_hashes
from gpu_worker.sim.tokenizer import SimTokenizer

RANGE = 0
ANSWER = 1
Segment = tuple[int, int, int]

# Mooncake's hash ids each stand for a block of this many tokens (traces/README.md).
MOONCAKE_BLOCK_TOKENS = 512

# Deterministic tier mix, by a hash of the session id (so every turn of a conversation has the
# same tier): the first 70 % of the hash range is free, the next 25 % plus, the last 5 %
# enterprise. A rough shape of a consumer chat product's paying mix; only shedding looks at it.
TIER_MIX: tuple[tuple[str, float], ...] = (("free", 0.70), ("plus", 0.95), ("enterprise", 1.0))


@dataclass(frozen=True, slots=True)
class TraceRequest:
    arrival_s: float
    request_id: str
    session_id: str
    prompt_tokens: int
    output_tokens: int
    segments: tuple[Segment, ...]
    # The engine's sampling seed for this request's answer (the next turn's ANSWER segment).
    seed: int
    turn: int = 0


@dataclass(frozen=True)
class Trace:
    name: str
    # Sorted by arrival (ties keep file order).
    requests: Sequence[TraceRequest]
    # Whether any two requests can share a KV block. False for the Azure traces (unique token
    # ids per request): the simulator then skips the prefix index and the bounds are exactly 0.
    shares_prefixes: bool
    # Offsets that make a rate-scaling copy's token ids and answer seeds disjoint from every
    # other copy's: larger than any RANGE id / seed the base trace uses.
    token_stride: int
    seed_stride: int
    # Whether later prompts contain earlier answers (synthetic chat), so an answer's KV blocks
    # count as cached for the bounds. Mooncake's hash ids do not reproduce answer tokens.
    answers_reused: bool = False

    @property
    def span_s(self) -> float:
        if not self.requests:
            return 0.0
        return self.requests[-1].arrival_s - self.requests[0].arrival_s

    @property
    def max_request_tokens(self) -> int:
        return max((r.prompt_tokens + r.output_tokens for r in self.requests), default=0)

    def sessions(self) -> int:
        return len({r.session_id for r in self.requests})


def tier_of(session_id: str) -> str:
    u = _unit(session_id)
    for tier, upper in TIER_MIX:
        if u < upper:
            return tier
    return TIER_MIX[-1][0]


def _unit(text: str) -> float:
    """A stable uniform number in [0, 1) from a string (blake2b: same in every process)."""
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


# -- loaders ----------------------------------------------------------------------------------


def load_azure(path: str | Path, name: str | None = None) -> Trace:
    """Azure LLM inference trace 2023: TIMESTAMP,ContextTokens,GeneratedTokens.

    No session ids and no content: every request is its own session with unique token ids, so
    no two requests share KV (these traces measure arrival burstiness and length mixes).
    """
    path = Path(path)
    rows: list[tuple[float, int, int, int]] = []
    t0: datetime | None = None
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        expected = ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]
        if header is None or [h.strip() for h in header] != expected:
            raise ValueError(f"{path}:1: expected header {','.join(expected)}, got {header!r}")
        for row in reader:
            line = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != 3:
                raise ValueError(f"{path}:{line}: expected 3 fields, got {len(row)}: {row!r}")
            try:
                ts = datetime.fromisoformat(row[0].strip())
            except ValueError:
                raise ValueError(f"{path}:{line}: bad TIMESTAMP {row[0]!r}") from None
            context = _positive_int(row[1], "ContextTokens", path, line)
            generated = _positive_int(row[2], "GeneratedTokens", path, line)
            if t0 is None:
                t0 = ts
            rows.append(((ts - t0).total_seconds(), context, generated, line))
    if not rows:
        raise ValueError(f"{path}: no requests")
    rows.sort(key=lambda r: (r[0], r[3]))
    start = rows[0][0]
    requests: list[TraceRequest] = []
    base = 0
    for i, (t, context, generated, _line) in enumerate(rows):
        rid = f"az{i}"
        requests.append(
            TraceRequest(
                arrival_s=t - start,
                request_id=rid,
                session_id=rid,
                prompt_tokens=context,
                output_tokens=generated,
                segments=((RANGE, base, context),),
                seed=i,
            )
        )
        base += context
    return Trace(
        name=name or path.stem,
        requests=requests,
        shares_prefixes=False,
        token_stride=base,
        seed_stride=len(requests),
    )


def _positive_int(text: str, field: str, path: Path, line: int) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"{path}:{line}: {field} must be an integer, got {text!r}") from None
    if value < 1:
        raise ValueError(f"{path}:{line}: {field} must be >= 1, got {value}")
    return value


@dataclass(frozen=True)
class _MooncakeRow:
    arrival_s: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]
    line: int


def load_mooncake(path: str | Path, name: str | None = None) -> Trace:
    """Mooncake JSONL: timestamp (ms), input_length, output_length, hash_ids (512-token blocks).

    Each hash id becomes 512 token ids (a RANGE keyed by the id), the last one cut to the
    prompt's length, so requests sharing leading hash ids share real KV blocks (32 engine blocks
    of 16 tokens per hash id). Conversations are rebuilt as chains (see `chain_sessions`).
    """
    path = Path(path)
    rows: list[_MooncakeRow] = []
    with path.open() as f:
        for line_no, text in enumerate(f, start=1):
            if not text.strip():
                continue
            rows.append(_parse_mooncake_line(text, path, line_no))
    if not rows:
        raise ValueError(f"{path}: no requests")
    rows.sort(key=lambda r: (r.arrival_s, r.line))
    sessions = chain_sessions([r.hash_ids for r in rows])
    max_id = max((h for r in rows for h in r.hash_ids), default=0)
    block = MOONCAKE_BLOCK_TOKENS
    start = rows[0].arrival_s
    turns: dict[str, int] = {}
    requests: list[TraceRequest] = []
    for i, (r, sid) in enumerate(zip(rows, sessions, strict=True)):
        last = r.input_length - block * (len(r.hash_ids) - 1)
        segments = tuple(
            (RANGE, h * block, block if j < len(r.hash_ids) - 1 else last) for j, h in enumerate(r.hash_ids)
        )
        turn = turns.get(sid, 0)
        turns[sid] = turn + 1
        requests.append(
            TraceRequest(
                arrival_s=r.arrival_s - start,
                request_id=f"mc{i}",
                session_id=sid,
                prompt_tokens=r.input_length,
                output_tokens=r.output_length,
                segments=segments,
                seed=i,
                turn=turn,
            )
        )
    return Trace(
        name=name or path.stem,
        requests=requests,
        shares_prefixes=True,
        token_stride=(max_id + 1) * block,
        seed_stride=len(requests),
    )


def _parse_mooncake_line(text: str, path: Path, line: int) -> _MooncakeRow:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{line}: not valid JSON: {exc.msg}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}:{line}: expected a JSON object")
    for key in ("timestamp", "input_length", "output_length", "hash_ids"):
        if key not in obj:
            raise ValueError(f"{path}:{line}: missing field {key!r}")
    ts = obj["timestamp"]
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts) or ts < 0:
        raise ValueError(f"{path}:{line}: timestamp must be a number of ms >= 0, got {ts!r}")
    ints: dict[str, int] = {}
    for key in ("input_length", "output_length"):
        v = obj[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{path}:{line}: {key} must be an integer >= 1, got {v!r}")
        ints[key] = v
    hash_ids = obj["hash_ids"]
    if (
        not isinstance(hash_ids, list)
        or not hash_ids
        or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 0 for h in hash_ids)
    ):
        raise ValueError(f"{path}:{line}: hash_ids must be a non-empty list of integers >= 0")
    block = MOONCAKE_BLOCK_TOKENS
    n_in = ints["input_length"]
    if not (len(hash_ids) - 1) * block < n_in <= len(hash_ids) * block:
        raise ValueError(
            f"{path}:{line}: input_length {n_in} does not match {len(hash_ids)} hash ids of {block} tokens"
        )
    return _MooncakeRow(ts / 1000.0, n_in, ints["output_length"], tuple(hash_ids), line)


def chain_sessions(requests_hash_ids: Sequence[Sequence[int]]) -> list[str]:
    """Session id per request (in order), rebuilding multi-turn conversations from hash ids.

    Request B is the next turn of an earlier request A when B has at least as many blocks and
    agrees with A on all of A's blocks but the last (a turn's last block holds its partial tail,
    which changes when the conversation grows: the next prompt is this one plus the answer plus
    a new message); a one-block A needs its block matched. Only a session's latest turn can be
    extended (a second request extending the same turn starts a new session: a fork or a shared
    document, not the same conversation). Among candidates the longest match wins, then the
    most recent. Deterministic; sessions are named after their first request ("s<index>").
    """
    # Open session tails by their stem (all blocks but the last; the one block of a 1-block
    # turn): stem -> [(tail length, session), ...] in arrival order.
    tails: dict[tuple[int, ...], list[tuple[int, str]]] = {}
    out: list[str] = []
    for i, hashes in enumerate(requests_hash_ids):
        h = tuple(hashes)
        chosen: str | None = None
        for j in range(len(h), 0, -1):
            candidates = tails.get(h[:j])
            if not candidates:
                continue
            for k in range(len(candidates) - 1, -1, -1):
                tail_len, sid = candidates[k]
                if tail_len <= len(h):
                    chosen = sid
                    del candidates[k]
                    if not candidates:
                        del tails[h[:j]]
                    break
            if chosen is not None:
                break
        sid = chosen if chosen is not None else f"s{i}"
        stem = h[:-1] if len(h) > 1 else h
        tails.setdefault(stem, []).append((len(h), sid))
        out.append(sid)
    return out


@dataclass(frozen=True)
class SyntheticSpec:
    """A multi-turn chat workload: sessions arrive as a Poisson process, each picks a shared
    system prompt (Zipf-popular), then alternates user messages and answers with think time
    in between; every turn's prompt is the whole conversation so far."""

    duration_s: float = 600.0
    sessions_per_s: float = 2.0
    mean_turns: float = 4.0
    system_prompts: int = 16
    system_prompt_tokens: tuple[int, int] = (256, 2048)
    user_tokens_median: int = 120
    answer_tokens_median: int = 250
    max_answer_tokens: int = 1024
    think_time_mean_s: float = 20.0
    # Open loop: a turn's arrival does not wait for the previous answer in the simulation, so
    # the generator spaces turns by an estimate of the answer's generation time (tokens at
    # this many seconds each) plus the think time.
    assumed_s_per_token: float = 0.015
    max_context_tokens: int = 8192


def synthetic_trace(spec: SyntheticSpec | None = None, seed: int = 0) -> Trace:
    spec = spec or SyntheticSpec()
    rng = random.Random(seed)
    block = 16
    # System prompts: token ids 0 .. ; each a whole number of 16-token blocks so the prompt's
    # blocks are shared exactly between the sessions using it.
    lo, hi = spec.system_prompt_tokens
    sys_prompts: list[Segment] = []
    next_id = 0
    for _ in range(spec.system_prompts):
        n = max(block, rng.randint(lo, hi) // block * block)
        sys_prompts.append((RANGE, next_id, n))
        next_id += n
    weights = [1.0 / (k + 1) for k in range(spec.system_prompts)]
    cum = [sum(weights[: k + 1]) for k in range(len(weights))]
    raw: list[TraceRequest] = []
    t = 0.0
    s = 0
    seed_next = 0
    while True:
        t += rng.expovariate(spec.sessions_per_s)
        if t > spec.duration_s:
            break
        sid = f"syn{s}"
        s += 1
        sys_seg = sys_prompts[bisect.bisect_left(cum, rng.random() * cum[-1])]
        history: tuple[Segment, ...] = (sys_seg,)
        context = sys_seg[2]
        turns = 1 + int(rng.expovariate(1.0 / max(spec.mean_turns - 1.0, 1e-9)))
        arrival = t
        for turn in range(turns):
            user = max(1, int(rng.lognormvariate(math.log(spec.user_tokens_median), 0.8)))
            answer = min(
                spec.max_answer_tokens,
                max(1, int(rng.lognormvariate(math.log(spec.answer_tokens_median), 0.7))),
            )
            if context + user + answer > spec.max_context_tokens:
                break
            segments = (*history, (RANGE, next_id, user))
            next_id += user
            req_seed = seed_next
            seed_next += 1
            raw.append(
                TraceRequest(
                    arrival_s=arrival,
                    request_id=f"{sid}t{turn}",
                    session_id=sid,
                    prompt_tokens=context + user,
                    output_tokens=answer,
                    segments=segments,
                    seed=req_seed,
                    turn=turn,
                )
            )
            history = (*segments, (ANSWER, req_seed, answer))
            context += user + answer
            arrival += answer * spec.assumed_s_per_token + rng.expovariate(1.0 / spec.think_time_mean_s)
    raw.sort(key=lambda r: r.arrival_s)
    return Trace(
        name="synthetic",
        requests=raw,
        shares_prefixes=True,
        token_stride=max(next_id, 1),
        seed_stride=max(seed_next, 1),
        answers_reused=True,
    )


TRACE_ALIASES = {
    "azure_conv": "azure_conv_2023.csv",
    "azure_code": "azure_code_2023.csv",
    "mooncake": "mooncake_synthetic.jsonl",
}


def trace_dirs() -> list[Path]:
    """Where trace aliases are looked up: $KVGATE_TRACE_DIR, then ../shared/traces next to the
    working directory and next to the repository (traces/README.md: load them from there)."""
    dirs: list[Path] = []
    env = os.environ.get("KVGATE_TRACE_DIR")
    if env:
        dirs.append(Path(env))
    dirs.append(Path.cwd().parent / "shared" / "traces")
    dirs.append(Path(__file__).resolve().parents[3] / "shared" / "traces")
    return dirs


def resolve_trace_path(spec: str) -> Path:
    candidate = Path(spec)
    if candidate.exists():
        return candidate
    filename = TRACE_ALIASES.get(spec, spec)
    for d in trace_dirs():
        p = d / filename
        if p.exists():
            return p
    searched = ", ".join(str(d) for d in trace_dirs())
    raise ValueError(f"trace {spec!r} not found (as a path, or {filename} in {searched})")


def load_trace(spec: str, seed: int = 0, synthetic: SyntheticSpec | None = None) -> Trace:
    """`synthetic`, an alias (azure_conv, azure_code, mooncake) or a path (.csv or .jsonl)."""
    if spec == "synthetic":
        return synthetic_trace(synthetic, seed)
    path = resolve_trace_path(spec)
    name = spec if spec in TRACE_ALIASES else path.stem
    if path.suffix == ".csv":
        return load_azure(path, name)
    if path.suffix in (".jsonl", ".json"):
        return load_mooncake(path, name)
    raise ValueError(f"trace {path}: unknown format (expected .csv (Azure) or .jsonl (Mooncake))")


# -- rate scaling -----------------------------------------------------------------------------


def scaled_requests(
    trace: Trace, rate_scale: float, seed: int = 0, duration_s: float | None = None
) -> Iterator[TraceRequest]:
    """The trace at `rate_scale` times its request rate, lazily, in arrival order.

    K > 1 overlays ceil(K) copies; copy c is shifted by c/ceil(K) of the mean inter-arrival gap
    (so copies interleave and keep the trace's burst shape and the order inside each
    conversation), gets fresh request/session ids and disjoint token ids and answer seeds (so
    copies share no cache). A fractional part f keeps each session of the last copy with
    probability f; K < 1 thins copy 0 the same way. Thinning is by session (a conversation is
    kept or dropped whole), with a stable hash of (seed, copy, session): deterministic.
    `duration_s` drops arrivals after it.
    """
    if not rate_scale > 0 or not math.isfinite(rate_scale):
        raise ValueError(f"rate scale must be a positive number, got {rate_scale}")
    n_copies = math.ceil(rate_scale)
    full = math.floor(rate_scale)
    base = trace.requests
    gap = trace.span_s / max(len(base) - 1, 1)
    streams: list[Iterator[TraceRequest]] = []
    for c in range(n_copies):
        keep = 1.0 if c < full else rate_scale - full
        streams.append(_copy(trace, c, c * gap / n_copies, keep, seed))
    merged = heapq.merge(*streams, key=lambda r: r.arrival_s)
    if duration_s is None:
        yield from merged
        return
    for r in merged:
        if r.arrival_s > duration_s:
            return
        yield r


def _copy(trace: Trace, c: int, shift: float, keep: float, seed: int) -> Iterator[TraceRequest]:
    token_off = c * trace.token_stride
    seed_off = c * trace.seed_stride
    kept: dict[str, bool] = {}
    for r in trace.requests:
        if keep < 1.0:
            k = kept.get(r.session_id)
            if k is None:
                k = _unit(f"{seed}/{c}/{r.session_id}") < keep
                kept[r.session_id] = k
            if not k:
                continue
        if c == 0:
            yield r
            continue
        yield replace(
            r,
            arrival_s=r.arrival_s + shift,
            request_id=f"{r.request_id}~{c}",
            session_id=f"{r.session_id}~{c}",
            segments=tuple(
                (kind, a + token_off if kind == RANGE else a + seed_off, n) for kind, a, n in r.segments
            ),
            seed=r.seed + seed_off,
        )


def expected_requests(trace: Trace, rate_scale: float) -> int:
    """About how many requests scaled_requests yields (for progress reports)."""
    return round(len(trace.requests) * rate_scale)


# -- token ids and block hashes ---------------------------------------------------------------

_TOKENIZER = SimTokenizer()


def segment_tokens(segment: Segment) -> Sequence[int]:
    kind, a, n = segment
    if kind == RANGE:
        return range(a, a + n)
    return _TOKENIZER.sample_many(a, 0, n)


def prompt_token_ids(request: TraceRequest) -> Sequence[int]:
    """The prompt's token ids. A one-segment prompt (every Azure request) comes back as its
    range or list unchanged: the engine keeps a range as it is (and copies anything else), and
    building lists of a million requests' tokens was a quarter of an Azure run."""
    segments = request.segments
    if len(segments) == 1:
        return segment_tokens(segments[0])
    out: list[int] = []
    for seg in segments:
        out.extend(segment_tokens(seg))
    return out


class PrefixHasher:
    """Chained KV block hashes of a request's prompt, the same values as
    `block_hashes(prompt_token_ids(request), block_size)` (and so as the engines' KV events).

    Block-aligned RANGE segments are memoised by (parent hash, segment): a Mooncake hash id
    reused by many requests is hashed once, not once per request. The memo is bounded (oldest
    entries dropped first): reuse in these traces is mostly recent.
    """

    def __init__(self, block_size: int = 16, memo_entries: int = 32_768) -> None:
        self.block_size = block_size
        self._memo: dict[tuple[int | None, int, int], tuple[int, ...]] = {}
        self._memo_entries = memo_entries

    def hashes(self, segments: Iterable[Segment]) -> list[int]:
        bs = self.block_size
        memo = self._memo
        out: list[int] = []
        parent: int | None = None
        pending: list[int] = []
        for seg in segments:
            kind, a, n = seg
            if not pending and kind == RANGE and n % bs == 0:
                key = (parent, a, n)
                hs = memo.get(key)
                if hs is None:
                    hs = tuple(block_hashes(range(a, a + n), bs, parent))
                    if len(memo) >= self._memo_entries:
                        del memo[next(iter(memo))]
                    memo[key] = hs
                if hs:
                    out.extend(hs)
                    parent = hs[-1]
                continue
            pending.extend(segment_tokens(seg))
            whole = len(pending) // bs * bs
            if whole:
                hs_list = block_hashes(pending[:whole], bs, parent)
                out.extend(hs_list)
                parent = hs_list[-1]
                del pending[:whole]
        return out

    def request_hashes(self, request: TraceRequest) -> list[int]:
        return self.hashes(request.segments)

    def cached_after(self, request: TraceRequest, answers_reused: bool) -> list[int]:
        """Blocks a worker caches once the request is done: its prompt's and, when later
        prompts contain answers (synthetic chat), its answer's (all but the last sampled token,
        which the engine never computes)."""
        if not answers_reused or request.output_tokens <= 1:
            return self.hashes(request.segments)
        return self.hashes((*request.segments, (ANSWER, request.seed, request.output_tokens - 1)))
