"""The canned responder for quarantined API keys: a chat stream that only ever meows.

A quarantined key (suspected abuse: scraping, prompt attacks, a leaked key being resold)
keeps getting answers that look like a normal stream — a placement on a plausible worker,
deltas at a human-plausible pace, a Done with usage — so whoever holds it learns nothing
about the quarantine. It never touches the scheduler or a GPU: the fleet's capacity is
for the customers.

`Meower.stream` has the shape of `TurnRunner.stream`, so the servicer treats both alike.

Its placement names a worker, region and engine that this gateway's real turns were placed on
lately (`FleetLook`): a real answer says `engine: "sim"` on a simulated fleet and `"vllm"` on a
GPU one, so no fixed label can pass for both. Until the replica has relayed a real turn it knows
no worker, and makes up names in the fleet's style with engine "vllm", what a GPU fleet runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from gateway.metrics import QUARANTINED_TURNS
from gateway.relay import Runner, TurnJob, TurnProgress
from kvgate.v1 import chat_pb2

# Same naming as a real fleet's workers: the stream must not stand out.
REGIONS = ("us-east", "us-west", "eu-west", "eu-central", "ap-southeast")
# The engine named before any real placement was seen (see the module docstring).
DEFAULT_ENGINE = "vllm"
# Workers remembered: enough to spread fake sessions over, a few KB.
LOOK_SIZE = 64
# Quarantined sessions whose fake worker is remembered (~200 bytes each: about 1 MB).
SESSIONS_REMEMBERED = 4096
ENDINGS = (".", ".", ".", "!", "?", "…")


@dataclass(frozen=True)
class Pace:
    """Seconds before the first token and between tokens (uniform ranges): a busy GPU's pace."""

    first_token_s: tuple[float, float] = (0.2, 0.6)
    per_token_s: tuple[float, float] = (0.025, 0.07)


def meows(count: int, rng: random.Random) -> list[str]:
    """`count` tokens of sentences made of meows: "Meow", " meow", " meow." ..."""
    tokens: list[str] = []
    left_in_sentence = 0
    for i in range(count):
        if left_in_sentence == 0:
            left_in_sentence = rng.randint(1, 4)
            word = "Meow" if i == 0 else " Meow"
        else:
            word = " meow"
        left_in_sentence -= 1
        if left_in_sentence == 0 or i == count - 1:
            word += rng.choice(ENDINGS)
        tokens.append(word)
    return tokens


def fake_worker(key: bytes) -> tuple[str, str]:
    """A (worker id, region) in the fleet's naming style, the same for the same key."""
    digest = hashlib.sha256(key).digest()
    region = REGIONS[digest[0] % len(REGIONS)]
    return f"{region.split('-')[0]}-{digest[1] % 8 + 1}", region


class FleetLook:
    """The workers (id, region, engine) that real turns of this gateway were placed on lately, and
    the fake worker each quarantined session was given."""

    def __init__(self, size: int = LOOK_SIZE, sessions: int = SESSIONS_REMEMBERED) -> None:
        self._size = size
        self._workers: OrderedDict[str, tuple[str, str]] = OrderedDict()  # id -> (region, engine)
        self._sessions_size = sessions
        self._sessions: OrderedDict[str, tuple[str, str, str]] = OrderedDict()

    def observe(self, placement: chat_pb2.Placement) -> None:
        self._workers[placement.worker_id] = (placement.region, placement.engine)
        self._workers.move_to_end(placement.worker_id)
        if len(self._workers) > self._size:
            self._workers.popitem(last=False)

    def worker_for(self, session_id: str) -> tuple[str, str, str]:
        """(worker id, region, engine) for a fake placement. A session keeps its first pick while
        it is remembered, however the workers seen churn since: a real session stays pinned and
        reports cache hits on one worker. The pick is the session's highest rendezvous hash among
        the workers seen, so a session forgotten here, or asked about at another replica that saw
        the same workers, is likely to get the same one again."""
        if not session_id:  # a stateless turn without an affinity key: nothing pins it
            return self._pick(random.randbytes(8))
        known = self._sessions.get(session_id)
        if known is None:
            known = self._sessions[session_id] = self._pick(session_id.encode())
            if len(self._sessions) > self._sessions_size:
                self._sessions.popitem(last=False)
        self._sessions.move_to_end(session_id)
        return known

    def _pick(self, key: bytes) -> tuple[str, str, str]:
        if not self._workers:
            return (*fake_worker(key), DEFAULT_ENGINE)
        worker_id = max(self._workers, key=lambda w: hashlib.sha256(key + b"\0" + w.encode()).digest())
        return (worker_id, *self._workers[worker_id])

    def watch(self, runner: Runner) -> Runner:
        """`runner`, noting every placement its streams announce."""
        return _Watched(runner, self)


class _Watched:
    def __init__(self, runner: Runner, look: FleetLook) -> None:
        self._runner = runner
        self._look = look

    async def stream(self, job: TurnJob, progress: TurnProgress) -> AsyncGenerator[chat_pb2.SendEvent, None]:
        # aclosing: closing this stream closes the runner's at once (see RefundUnlessServed).
        async with contextlib.aclosing(self._runner.stream(job, progress)) as events:
            async for event in events:
                if event.HasField("placement"):
                    self._look.observe(event.placement)
                yield event


class Meower:
    def __init__(
        self, pace: Pace | None = None, rng: random.Random | None = None, look: FleetLook | None = None
    ) -> None:
        self._pace = pace or Pace()
        self._rng = rng or random.Random()
        self._look = look or FleetLook()

    async def stream(self, job: TurnJob, progress: TurnProgress) -> AsyncGenerator[chat_pb2.SendEvent, None]:
        QUARANTINED_TURNS.inc()
        worker_id, region, engine = self._look.worker_for(job.session_id)
        # A continued conversation would have been a cache hit on its pinned worker.
        continued = sum(1 for m in job.messages if m.role == "assistant") > 0
        progress.worker_id, progress.region = worker_id, region
        progress.prompt_tokens = job.prompt_tokens_estimate
        progress.cached_tokens = job.prompt_tokens_estimate * 3 // 4 if continued else 0
        count = min(job.max_tokens, self._rng.randint(12, 60))
        await asyncio.sleep(self._rng.uniform(*self._pace.first_token_s))
        yield chat_pb2.SendEvent(
            placement=chat_pb2.Placement(
                worker_id=worker_id, region=region, cache_hit=continued, engine=engine
            )
        )
        for i, token in enumerate(meows(count, self._rng)):
            if i:
                await asyncio.sleep(self._rng.uniform(*self._pace.per_token_s))
            else:
                progress.first_token_at = time.monotonic()
            progress.parts.append(token)
            progress.completion_tokens += 1
            yield chat_pb2.SendEvent(delta=chat_pb2.TextDelta(text=token))
        progress.finish_reason = "length" if count == job.max_tokens else "stop"
