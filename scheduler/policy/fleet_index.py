"""A FleetView that keeps its workers grouped by everything the default filters and scorers read,
so that `Pipeline.top` can find the best k workers without scoring the whole fleet.

Performance only: `fast_top` returns exactly what the full pipeline returns (same workers, same
order), or None when it does not apply (other filters or scorers, excluded workers, k None).
The fleet simulator calls place() about a million times on up to a thousand workers; scoring
every worker per call dominated it.

How it stays exact:

- A *class* is a set of workers whose views agree on every field a default filter or scorer
  reads except the worker id (model, state, age, free and total tokens, running, waiting,
  max_num_seqs, and the id's length, see below). Regions are left out: fast_top steps aside when
  a request's region would be scored. Absent prefix hits, members of a class
  pass the same filters and get the same total, computed once per class with the same float
  operations, in the same order, as the scorers use.
- Classes are visited by usable free tokens, highest first. Every score is in [0, 1] and only
  the free-token score depends on the free tokens (increasingly), so a class's total is at most
  the same sum with every other score at 1 (prefix 0: workers with prefix hits are scored one by
  one). Once k workers score strictly above that bound, no later class can enter the top k.
- Ties are broken by `_tie_break` = (crc32(worker id, crc32(salt)), worker id). CRC-32 is affine
  over GF(2): for ids of one length, crc32(id, s) = crc32(id, 0) ^ d(s, length). So within a class
  the tie order is the order of crc32(id, 0) ^ d, and the smallest few of those come from a binary
  walk over the class's sorted crc32(id, 0) values (`_xor_smallest`) instead of hashing every
  member. The final order of the few selected workers uses `_tie_break` itself.
"""

from __future__ import annotations

import zlib
from bisect import bisect_left, insort
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from heapq import heappop, heappush
from typing import TYPE_CHECKING

from scheduler.policy.model import FleetView, PlacementRequest, WorkerView
from scheduler.policy.signals import (
    AcceptsNewSessions,
    Alive,
    BatchSweetSpot,
    Fits,
    FreeTokensAfterPlacement,
    PrefixAffinity,
    SameRegion,
    ServesModel,
)

if TYPE_CHECKING:
    from scheduler.policy.framework import Pipeline

# Bits for the worker's index below its crc32 in a packed member entry (crc << _SHIFT | index).
_SHIFT = 24
_IDX_MASK = (1 << _SHIFT) - 1
_FILTERS = (ServesModel, Alive, AcceptsNewSessions, Fits)
_PER_WORKER_SCORERS = (BatchSweetSpot, SameRegion)

_ClassKey = tuple[object, ...]


def _class_key(view: WorkerView) -> _ClassKey:
    return (
        len(view.worker_id.encode()),
        view.model,
        view.state,
        view.age_s,
        view.free_tokens,
        view.capacity_tokens,
        view.running,
        view.waiting,
        view.max_num_seqs,
    )


class _Class:
    __slots__ = ("key", "members", "rep", "usable_free")

    def __init__(self, key: _ClassKey, rep: WorkerView, usable_free: int) -> None:
        self.key = key
        self.rep = rep
        self.usable_free = usable_free
        # Packed crc32(worker id, 0) << _SHIFT | worker index, sorted.
        self.members: list[int] = []


@dataclass(frozen=True, eq=False)
class IndexedFleetView(FleetView):
    """A FleetView whose `workers` dict is changed only through `put`, which keeps the classes
    (see the module docstring) up to date. Reads are those of a plain FleetView."""

    _classes: dict[_ClassKey, _Class] = field(init=False, repr=False, compare=False)
    # Distinct usable free token counts of the classes, negated (ascending = most free first),
    # and the classes per count.
    _order: list[int] = field(init=False, repr=False, compare=False)
    _by_free: dict[int, list[_Class]] = field(init=False, repr=False, compare=False)
    _index_of: dict[str, int] = field(init=False, repr=False, compare=False)
    _views: list[WorkerView] = field(init=False, repr=False, compare=False)
    _crc: list[int] = field(init=False, repr=False, compare=False)
    _packed: dict[str, int] = field(init=False, repr=False, compare=False)
    _class_of: dict[str, _Class] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.workers, dict):
            raise TypeError("IndexedFleetView needs a dict of workers (it updates it in put())")
        views = dict(self.workers)
        self.workers.clear()
        for name in ("_classes", "_by_free", "_index_of", "_packed", "_class_of"):
            object.__setattr__(self, name, {})
        for name in ("_order", "_views", "_crc"):
            object.__setattr__(self, name, [])
        for view in views.values():
            self.put(view)

    def put(self, view: WorkerView) -> None:
        """Add or replace the worker's view."""
        wid = view.worker_id
        workers = self.workers
        assert isinstance(workers, dict)
        packed = self._packed.get(wid)
        if packed is None:
            idx = len(self._views)
            if idx > _IDX_MASK:
                raise ValueError("too many workers for the fleet index")
            self._index_of[wid] = idx
            self._views.append(view)
            crc = zlib.crc32(wid.encode())
            self._crc.append(crc)
            packed = self._packed[wid] = crc << _SHIFT | idx
        else:
            old = self._class_of[wid]
            members = old.members
            del members[bisect_left(members, packed)]
            if not members:
                self._drop_class(old)
            self._views[packed & _IDX_MASK] = view
        workers[wid] = view
        key = _class_key(view)
        cls = self._classes.get(key)
        if cls is None:
            cls = self._classes[key] = _Class(key, view, self.usable_free_tokens_of((view,))[0])
            free = cls.usable_free
            same = self._by_free.get(free)
            if same is None:
                self._by_free[free] = [cls]
                insort(self._order, -free)
            else:
                same.append(cls)
        insort(cls.members, packed)
        self._class_of[wid] = cls

    def _drop_class(self, cls: _Class) -> None:
        del self._classes[cls.key]
        free = cls.usable_free
        same = self._by_free[free]
        same.remove(cls)
        if not same:
            del self._by_free[free]
            order = self._order
            del order[bisect_left(order, -free)]


def applies(pipeline: Pipeline) -> bool:
    """Whether fast_top can stand in for this pipeline's top (default filters and scorers only)."""
    if not all(type(f) in _FILTERS for f in pipeline.filters):
        return False
    for ws in pipeline.scorers:
        if not ws.weight >= 0.0 or ws.weight == float("inf"):
            return False
        if type(ws.scorer) not in (FreeTokensAfterPlacement, PrefixAffinity, *_PER_WORKER_SCORERS):
            return False
    return True


# How fast_top scores one scorer: the free-token formula inline, prefix hits per worker, or the
# scorer itself on a one-worker list (per-worker scorers).
_FREE = 0
_PREFIX = 1
_OTHER = 2


def scoring_plan(pipeline: Pipeline) -> tuple[tuple[int, object, float], ...]:
    plan: list[tuple[int, object, float]] = []
    for ws in pipeline.scorers:
        if ws.weight == 0.0:
            continue  # not evaluated by Pipeline.totals either
        if isinstance(ws.scorer, FreeTokensAfterPlacement):
            plan.append((_FREE, ws.scorer, ws.weight))
        elif isinstance(ws.scorer, PrefixAffinity):
            plan.append((_PREFIX, ws.scorer, ws.weight))
        else:
            plan.append((_OTHER, ws.scorer, ws.weight))
    return tuple(plan)


def fast_top(
    pipeline: Pipeline,
    request: PlacementRequest,
    fleet: IndexedFleetView,
    k: int,
    tie_break: Callable[[bytes, str], tuple[int, str]],
    plan: tuple[tuple[int, object, float], ...],
) -> list[WorkerView] | None:
    """`pipeline.top(request, fleet, k)` for an indexed fleet (`tie_break` is the pipeline's,
    `plan` its scoring_plan), or None if this shortcut does not apply (the caller then runs the
    full pipeline). No nested functions: closures that refer to themselves are reference cycles,
    garbage only the cyclic collector frees."""
    if request.exclude_workers or k <= 0:
        return None
    if request.client_region and any(isinstance(scorer, SameRegion) for _, scorer, _ in plan):
        return None  # region is not part of a class
    filters = pipeline.filters
    need = request.tokens_needed
    by_free = fleet._by_free
    order = fleet._order

    # The free-token score's normaliser: the most free tokens among feasible workers.
    top: int | None = None
    for neg in order:
        for c in by_free[-neg]:
            rep = c.rep
            if all(f.keep(request, rep, fleet) for f in filters):
                top = -neg - need
                break
        if top is not None:
            break
    if top is None:
        return []
    scale = 1.0 / top if top > 0 else 0.0

    hits = request.prefix_hit_blocks
    if not request.block_hashes:
        hits = {}
    # Candidates: workers with prefix hits, scored one by one, and classes.
    singles: list[tuple[float, WorkerView]] = []
    groups: list[tuple[float, _Class, int]] = []
    hit_in: dict[int, int] = {}  # id(class) -> its members with a prefix hit
    # The k-th best total so far: a min-heap of (total, workers) holding just over k workers.
    heap: list[tuple[float, int]] = []
    in_heap = 0
    if hits:
        class_of = fleet._class_of
        workers = fleet.workers
        for wid in hits:
            cls = class_of.get(wid)
            if cls is None:
                continue
            hit_in[id(cls)] = hit_in.get(id(cls), 0) + 1
            view = workers[wid]
            if not all(f.keep(request, view, fleet) for f in filters):
                continue
            t: float | None = None
            for kind, scorer, weight in plan:
                if kind == _FREE:
                    x = cls.usable_free - need
                    s = x * scale if top > 0 and x > 0 else 0.0
                else:
                    s = scorer.score(request, (view,), fleet)[0]  # type: ignore[attr-defined]
                t = weight * s if t is None else t + weight * s
            total = 0.0 if t is None else t
            singles.append((total, view))
            heappush(heap, (total, 1))
            in_heap += 1
            while in_heap - heap[0][1] >= k:
                in_heap -= heappop(heap)[1]

    for neg in order:
        if in_heap >= k:
            # Upper bound of any total at these free tokens (non-hit workers): other scores 1.
            t = None
            x = -neg - need
            for kind, _, weight in plan:
                if kind == _FREE:
                    s = x * scale if top > 0 and x > 0 else 0.0
                else:
                    s = 0.0 if kind == _PREFIX else 1.0
                t = weight * s if t is None else t + weight * s
            if (0.0 if t is None else t) < heap[0][0]:
                break
        for cls in by_free[-neg]:
            count = len(cls.members) - hit_in.get(id(cls), 0)
            rep = cls.rep
            if count <= 0 or not all(f.keep(request, rep, fleet) for f in filters):
                continue
            t = None
            for kind, scorer, weight in plan:
                if kind == _FREE:
                    x = cls.usable_free - need
                    s = x * scale if top > 0 and x > 0 else 0.0
                elif kind == _PREFIX:
                    s = 0.0
                else:
                    s = scorer.score(request, (rep,), fleet)[0]  # type: ignore[attr-defined]
                t = weight * s if t is None else t + weight * s
            total = 0.0 if t is None else t
            groups.append((total, cls, count))
            heappush(heap, (total, count))
            in_heap += count
            while in_heap - heap[0][1] >= k:
                in_heap -= heappop(heap)[1]

    kth = heap[0][0] if in_heap >= k else float("-inf")
    levels: dict[float, tuple[list[WorkerView], list[tuple[_Class, int]]]] = {}
    for total, view in singles:
        if total >= kth:
            levels.setdefault(total, ([], []))[0].append(view)
    for total, cls, count in groups:
        if total >= kth:
            levels.setdefault(total, ([], []))[1].append((cls, count))

    salt = (request.session_id or request.request_id).encode()
    salt_crc = zlib.crc32(salt)
    views = fleet._views
    crcs = fleet._crc
    # Per id length: crc32(id, salt_crc) == crc32(id, 0) ^ offset (see the module docstring).
    offsets: dict[object, int] = {}
    out: list[WorkerView] = []
    for total in sorted(levels, reverse=True):
        level_views, level_classes = levels[total]
        room = k - len(out)
        size = len(level_views) + sum(count for _, count in level_classes)
        # (crc32(id, crc32(salt)), id, view): tie_break's key, then the view.
        picked: list[tuple[int, str, WorkerView]] = []
        for view in level_views:
            crc, wid = tie_break(salt, view.worker_id)
            picked.append((crc, wid, view))
        for cls, _count in level_classes:
            length = cls.key[0]
            d = offsets.get(length)
            if d is None:
                first = cls.members[0] & _IDX_MASK
                d = offsets[length] = zlib.crc32(views[first].worker_id.encode(), salt_crc) ^ crcs[first]
            skip = hit_in.get(id(cls), 0)
            if size <= room:
                packed_members: Sequence[int] = cls.members
            else:
                packed_members = _class_smallest(cls.members, d, room + skip)
            for p in packed_members:
                view = views[p & _IDX_MASK]
                wid = view.worker_id
                if not skip or wid not in hits:
                    picked.append(((p >> _SHIFT) ^ d, wid, view))
        picked.sort()
        out.extend(e[2] for e in picked[:room])
        if len(out) >= k:
            break
    return out


def _class_smallest(members: list[int], d: int, m: int) -> Sequence[int]:
    """At least the m members with the smallest tie-break keys (all of them when a crc32 tie at
    the m-th place makes the cut ambiguous)."""
    if len(members) <= m:
        return members
    chosen = _xor_smallest(members, d, m + 1)
    if (chosen[m - 1] >> _SHIFT) == (chosen[m] >> _SHIFT):
        return members  # equal crc32 at the cut: let the exact sort decide among all
    return chosen[:m]


def _xor_smallest(members: list[int], d: int, m: int) -> list[int]:
    """At least the m entries of sorted `members` (crc << _SHIFT | index) with the smallest
    (crc ^ d, index), in that order: a walk down the binary trie the sorted list spells, taking
    a whole subtree when it fits (more than m only when one crc32 value holds the rest)."""
    out: list[int] = []
    key: Callable[[int], int] = (d << _SHIFT).__xor__
    # Subtrees still to visit, the next one last: (lo, hi, bit, prefix of the crc above bit).
    stack = [(0, len(members), 31, 0)]
    while stack and len(out) < m:
        lo, hi, bit, prefix = stack.pop()
        if hi - lo <= m - len(out) or bit < 0:
            out.extend(sorted(members[lo:hi], key=key))
            continue
        high = prefix | 1 << bit
        mid = bisect_left(members, high << _SHIFT, lo, hi)
        if d >> bit & 1:
            stack.append((lo, mid, bit - 1, prefix))
            stack.append((mid, hi, bit - 1, high))
        else:
            stack.append((mid, hi, bit - 1, high))
            stack.append((lo, mid, bit - 1, prefix))
    return out
