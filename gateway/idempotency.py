"""Send with an idempotency key: a turn is stored at most once, however often the client retries.

A client whose connection died after the gateway stored a turn but before Done arrived cannot
know whether the turn exists; it sends it again with the same key. Then:
- the turn is stored: it is replayed from the history (`Done.replayed`), nothing runs again;
- it is still running (the first request has not noticed the lost client yet): ABORTED with
  a retry pushback, so the client tries again once it has finished or been cancelled;
- otherwise the request claims the key and runs the turn; storing it records the key.
The claim is a lock in Redis that its holder renews every second while the turn runs, so a
gateway that dies mid-turn frees the key within CLAIM_TTL_S (3 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

import redis.exceptions

from gateway.sessions import SessionStore
from kvgate.v1 import chat_pb2

log = logging.getLogger(__name__)

# Short, so that a retry after its gateway died (the usual reason to retry) waits only seconds
# for the dead gateway's claim to lapse; the running turn renews it every CLAIM_RENEW_S.
CLAIM_TTL_S = 3.0
CLAIM_RENEW_S = 1.0
# A retry that finds the turn still running waits about this long before trying again.
RUNNING_RETRY_MS = 1500


class RunningTurn:
    """Holds a claimed idempotency key while its turn runs: kept alive, released unless stored."""

    def __init__(self, sessions: SessionStore, session_id: str, key: str, token: str) -> None:
        self._sessions = sessions
        self._session_id = session_id
        self._key = key
        self._token = token
        self.stored = False  # set once the turn is stored: storing released the key already
        self._keeper = asyncio.create_task(self._keep_alive())

    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(CLAIM_RENEW_S)
            try:
                if not await self._sessions.keep_claim(self._session_id, self._key, self._token, CLAIM_TTL_S):
                    log.warning("lost the claim on idempotency key of session %s", self._session_id)
                    return
            except redis.exceptions.RedisError as exc:
                log.warning("could not keep an idempotency claim alive: %s", exc)

    async def release(self) -> None:
        self._keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._keeper
        if self.stored:
            return
        try:
            await self._sessions.release_claim(self._session_id, self._key, self._token)
        except redis.exceptions.RedisError as exc:
            # The lock expires by itself within CLAIM_TTL_S.
            log.warning("could not release an idempotency claim: %s", exc)


def replay(session: chat_pb2.Session, turn_index: int) -> Iterator[chat_pb2.SendEvent]:
    """The stored turn as a Send stream: its text, then Done marked `replayed` (no placement)."""
    turn = session.turns[turn_index]
    if turn.assistant:
        yield chat_pb2.SendEvent(delta=chat_pb2.TextDelta(text=turn.assistant))
    yield chat_pb2.SendEvent(
        done=chat_pb2.Done(
            finish_reason=turn.finish_reason,
            usage=turn.usage,
            session_id=session.session_id,
            turn_index=turn_index,
            replayed=True,
        )
    )
