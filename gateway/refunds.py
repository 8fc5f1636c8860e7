"""A turn that was never served gives back the tokens it was charged.

The servicer charges a turn's prompt estimate plus max_tokens to the tenant's tokens-per-minute
bucket before it is placed. A turn shed for lack of capacity, refused by every scheduler or
worker, or rejected after placement never produced a token; keeping the charge would let a
client that retries after a shed drain its own bucket and be rate limited without ever being
served. A turn the client abandons is not refunded: its prompt may already have run on a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator

from gateway.auth import Caller
from gateway.gate import Gate
from gateway.relay import Runner, TurnJob, TurnProgress
from kvgate.v1 import chat_pb2


class RefundUnlessServed:
    """`runner`'s stream; when it fails (not cancelled) before any token, `tokens` are refunded."""

    def __init__(self, runner: Runner, gate: Gate, caller: Caller, tokens: int) -> None:
        self._runner = runner
        self._gate = gate
        self._caller = caller
        self._tokens = tokens

    async def stream(self, job: TurnJob, progress: TurnProgress) -> AsyncGenerator[chat_pb2.SendEvent, None]:
        try:
            # aclosing: a client going away closes this stream, which must end the worker's
            # call now, not whenever the garbage collector finalizes the inner generator.
            async with contextlib.aclosing(self._runner.stream(job, progress)) as events:
                async for event in events:
                    yield event
        except Exception:
            # CancelledError and GeneratorExit (the client went away) are not Exceptions.
            if progress.completion_tokens == 0:
                await self._gate.refund(self._caller, tokens=self._tokens)
            raise
