"""`kvgate chat`: talk to the gateway from a terminal, one-shot or interactively."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import queue
import signal
import sys
import threading
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
    parser.add_argument(
        "--max-tokens",
        type=_max_tokens,
        default=0,
        help="reply length limit in tokens (default: 0, the gateway's default)",
    )
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


UINT32_MAX = 2**32 - 1


def _max_tokens(value: str) -> int:
    try:
        tokens = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {value!r}") from None
    if tokens < 0:
        raise argparse.ArgumentTypeError(f"must be positive (or 0 for the gateway's default), got {tokens}")
    if tokens > UINT32_MAX:
        raise argparse.ArgumentTypeError(
            f"must be at most {UINT32_MAX} (the request field is 32 bits; the gateway's own limit, "
            f"4,096 by default, is lower), got {tokens}"
        )
    return tokens


async def _turn(
    client: ChatClient, session_id: str, text: str, args: argparse.Namespace, idempotency_key: str
) -> None:
    placement = chat_pb2.Placement()
    mid_line = False
    events = client.send(session_id, text, args.max_tokens, idempotency_key=idempotency_key)
    try:
        async with contextlib.aclosing(events):
            async for event in events:
                kind = event.WhichOneof("event")
                if kind == "placement":
                    placement = event.placement
                elif kind == "delta":
                    sys.stdout.write(event.delta.text)
                    sys.stdout.flush()
                    mid_line = True
                elif kind == "done":
                    sys.stdout.write("\n")
                    mid_line = False
                    _summary(event.done, placement, session_id, args)
    finally:
        if mid_line:  # stopped or failed mid-reply: what follows starts on a line of its own
            sys.stdout.write("\n")
            sys.stdout.flush()


def _summary(
    done: chat_pb2.Done, placement: chat_pb2.Placement, session_id: str, args: argparse.Namespace
) -> None:
    u = done.usage
    summary = f"[session {session_id} · worker {placement.worker_id} ({placement.region})"
    if args.verbose:
        summary += (
            f" · {'cache hit' if placement.cache_hit else 'cache miss'}"
            f" · engine {placement.engine} · ttft {u.ttft_s * 1000:.0f} ms"
            f" · prompt {u.prompt_tokens} (cached {u.cached_tokens})"
            f" · completion {u.completion_tokens}"
            f"{' · resumed' if u.resumed else ''}{' · replayed' if done.replayed else ''}"
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
        await _interactive(client, session_id, args)


HELP = "/new starts another session, /history shows this one, /quit leaves; Ctrl-C stops a reply"


async def _interactive(client: ChatClient, session_id: str, args: argparse.Namespace) -> None:
    """Read lines until /quit or end of input. A failed command (rate limited, shed, an invalid
    message) is reported and the session goes on; Ctrl-C stops the reply in progress (at the
    prompt, it leaves)."""
    print(f"session {session_id}; {HELP}", file=sys.stderr)
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    command: asyncio.Task[str] | None = None

    def interrupt() -> None:
        if command is not None and not command.done():
            command.cancel()
            return
        # At the prompt: leave now. The reader thread is blocked in input() holding stdin's lock,
        # and an interpreter shutting down around it aborts ("could not acquire lock for stdin").
        print(file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)

    lines = _LineReader(loop)
    loop.add_signal_handler(signal.SIGINT, interrupt)
    try:
        while True:
            line = await lines.read()
            if line is None or line.strip() == "/quit":
                return
            command = asyncio.create_task(_command(client, session_id, line, args))
            try:
                session_id = await command
            except asyncio.CancelledError:
                if main.cancelling():  # the program is stopping, not just this command
                    raise
                print(_stopped(line, session_id), file=sys.stderr)
            except grpc.aio.AioRpcError as exc:
                print(describe(exc), file=sys.stderr)
            finally:
                command = None
    finally:
        loop.remove_signal_handler(signal.SIGINT)


def _stopped(line: str, session_id: str) -> str:
    """What a command stopped by Ctrl-C may have left behind. The gateway may already have done
    its work when the stop came: a turn stored just before its Done arrived, a session created
    just before its reply."""
    text = line.strip()
    if text == "/new":
        return f"(stopped; a new session may have been created; still in session {session_id})"
    if text in ("/history", "/help"):
        return "(stopped)"
    return "(stopped; /history shows whether the turn was stored)"


async def _command(client: ChatClient, session_id: str, line: str, args: argparse.Namespace) -> str:
    """Run one line; returns the session id to go on with."""
    text = line.strip()
    if text == "/new":
        session = await _with_wait(
            args, lambda: client.create_session(model=args.model, system_prompt=args.system)
        )
        print(f"session {session.session_id}", file=sys.stderr)
        return session.session_id
    if text == "/history":
        for i, turn in enumerate((await client.get_session(session_id)).turns):
            print(f"[{i}] you: {turn.user}\n[{i}] assistant ({turn.worker_id}): {turn.assistant}")
    elif text == "/help":
        print(HELP, file=sys.stderr)
    elif text:
        await _send_turn(client, session_id, line, args)
    return session_id


class _LineReader:
    """input() on a daemon thread, one line per read(): unlike an executor thread, one still
    waiting at the prompt never keeps the program from exiting."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._asks: queue.SimpleQueue[asyncio.Future[str | None]] = queue.SimpleQueue()
        threading.Thread(target=self._run, name="chat-input", daemon=True).start()

    async def read(self) -> str | None:
        """The next line, or None at the end of input."""
        future: asyncio.Future[str | None] = self._loop.create_future()
        self._asks.put(future)
        return await future

    def _run(self) -> None:
        while True:
            future = self._asks.get()
            line = _prompt()
            try:
                self._loop.call_soon_threadsafe(_settle, future, line)
            except RuntimeError:  # the loop is closed: the program is ending
                return
            if line is None:
                return


def _settle(future: asyncio.Future[str | None], line: str | None) -> None:
    if not future.done():
        future.set_result(line)


def _prompt() -> str | None:
    try:
        return input("> ")
    except EOFError:
        return None


def describe(exc: grpc.aio.AioRpcError) -> str:
    """One line for a failed call: its status, the gateway's message and any retry hint."""
    pushback = dict(exc.trailing_metadata() or ()).get("grpc-retry-pushback-ms")
    hint = f" (retry in {pushback} ms)" if pushback else ""
    return f"{exc.code().name}: {exc.details()}{hint}"


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
            print(f"kvgate chat: {describe(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
