"""`kvgate chat`: talk to the gateway from a terminal, one-shot or interactively."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from gateway.client import ChatClient
from kvgate.v1 import chat_pb2

T = TypeVar("T")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "message",
        nargs="?",
        default=None,
        help="send this one message and exit (default: interactive prompt)",
    )
    parser.add_argument("--gateway", default="localhost:50050", help="gateway address (default: %(default)s)")
    parser.add_argument("--session", default="", help="continue this session id (default: start a new one)")
    parser.add_argument(
        "--model", default="", help="model for a new session (default: the gateway's default)"
    )
    parser.add_argument("--system", default="", help="system prompt for a new session")
    parser.add_argument("--max-tokens", type=int, default=0, help="reply length limit (default: gateway's)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("KVGATE_API_KEY", ""),
        help="API key, sent as 'authorization: Bearer ...' (default: $KVGATE_API_KEY;"
        " see `kvgate keys create`)",
    )
    parser.add_argument("--tls-ca", default=None, help="gateway speaks TLS: verify it with this PEM CA file")
    parser.add_argument(
        "--tls", action="store_true", help="gateway speaks TLS: verify it with the system roots"
    )
    parser.add_argument(
        "--wait",
        type=float,
        default=0.0,
        help="keep retrying this many seconds while the fleet is starting or full (default: 0)",
    )
    parser.add_argument(
        "--demo", action="store_true", help="run a short two-turn sample conversation (implies --verbose)"
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="print the worker, cache hit, TTFT and token counts of each turn",
    )


async def _turn(
    client: ChatClient, session_id: str, text: str, args: argparse.Namespace, idempotency_key: str
) -> None:
    placement = chat_pb2.Placement()
    async for event in client.send(session_id, text, args.max_tokens, idempotency_key=idempotency_key):
        kind = event.WhichOneof("event")
        if kind == "placement":
            placement = event.placement
        elif kind == "delta":
            sys.stdout.write(event.delta.text)
            sys.stdout.flush()
        elif kind == "done":
            sys.stdout.write("\n")
            u = event.done.usage
            summary = f"[session {session_id} · worker {placement.worker_id} ({placement.region})"
            if args.verbose:
                summary += (
                    f" · {'cache hit' if placement.cache_hit else 'cache miss'}"
                    f" · engine {placement.engine} · ttft {u.ttft_s * 1000:.0f} ms"
                    f" · prompt {u.prompt_tokens} (cached {u.cached_tokens})"
                    f" · completion {u.completion_tokens}"
                    f"{' · resumed' if u.resumed else ''}{' · replayed' if event.done.replayed else ''}"
                )
            print(summary + "]", file=sys.stderr)


DEMO_TURNS = (
    "Hi! In one paragraph, why does an LLM chat service care about KV-cache memory?",
    "And why should the second turn of a conversation stay on the same GPU?",
)
# ABORTED: a retry of a turn that is still running (same idempotency key) waits for it.
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED)


async def _with_wait(args: argparse.Namespace, attempt: Callable[[], Awaitable[T]]) -> T:
    """Retry while the fleet is starting up or full, honouring the server's pushback."""
    deadline = time.monotonic() + args.wait
    while True:
        try:
            return await attempt()
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in RETRYABLE or time.monotonic() >= deadline:
                raise
            pushback = dict(exc.trailing_metadata() or ()).get("grpc-retry-pushback-ms")
            delay = int(pushback) / 1000 if isinstance(pushback, str) and pushback.isdigit() else 1.0
            print(f"(waiting for the fleet: {exc.code().name}: {exc.details()})", file=sys.stderr)
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))


async def _send_turn(client: ChatClient, session_id: str, text: str, args: argparse.Namespace) -> None:
    # One key for every attempt at this turn: a retry after a lost connection replays a turn
    # the gateway already stored instead of storing it twice.
    key = uuid.uuid4().hex
    await _with_wait(args, lambda: _turn(client, session_id, text, args, key))


async def _chat(args: argparse.Namespace) -> None:
    async with ChatClient(
        args.gateway, api_key=args.api_key, tls_ca=args.tls_ca or ("" if args.tls else None)
    ) as client:
        session_id = args.session
        if not session_id:
            session = await _with_wait(
                args, lambda: client.create_session(model=args.model, system_prompt=args.system)
            )
            session_id = session.session_id
        if args.demo:
            args.verbose = True
            for text in DEMO_TURNS:
                print(f"> {text}")
                await _send_turn(client, session_id, text, args)
            return
        if args.message is not None:
            await _send_turn(client, session_id, args.message, args)
            return
        print(f"session {session_id}; /new starts another, /history shows it, /quit leaves", file=sys.stderr)
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, _prompt)
            if line is None or line.strip() == "/quit":
                return
            if line.strip() == "/new":
                session_id = (
                    await client.create_session(model=args.model, system_prompt=args.system)
                ).session_id
                print(f"session {session_id}", file=sys.stderr)
            elif line.strip() == "/history":
                for i, turn in enumerate((await client.get_session(session_id)).turns):
                    print(f"[{i}] you: {turn.user}\n[{i}] assistant ({turn.worker_id}): {turn.assistant}")
            elif line.strip():
                await _send_turn(client, session_id, line, args)


def _prompt() -> str | None:
    try:
        return input("> ")
    except EOFError:
        return None


def run(args: argparse.Namespace) -> int:
    try:
        asyncio.run(_chat(args))
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        if code == grpc.StatusCode.UNAVAILABLE and "connect" in (exc.details() or "").lower():
            print(
                f"kvgate chat: cannot reach the gateway at {args.gateway} ({exc.details()})", file=sys.stderr
            )
        else:
            pushback = dict(exc.trailing_metadata() or ()).get("grpc-retry-pushback-ms")
            hint = f" (retry in {pushback} ms)" if pushback else ""
            print(f"kvgate chat: {code.name}: {exc.details()}{hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
