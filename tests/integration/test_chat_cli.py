"""`kvgate chat` interactively, driven through its stdin against a real in-process gateway."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from tests.integration.fleet import Fleet


async def _chat(fleet: Fleet, *args: str) -> asyncio.subprocess.Process:
    assert fleet.gateway is not None
    return await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "kvgate.cli", "chat", "--gateway", fleet.gateway.address, *args],
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "KVGATE_API_KEY": ""},
    )


async def test_commands_and_a_failed_turn_do_not_end_the_session(fleet: Fleet) -> None:
    await fleet.start({"cli-1": ("us-east", 2000)}, gateway_overrides={"rate_limits": None})
    chat = await _chat(fleet, "--max-tokens", "4")
    lines = [
        "hello there",
        "/history",
        "bad \x01 message",
        "still here?",
        "/new",
        "/history",
        "fresh",
        "/quit",
    ]
    out, err = await asyncio.wait_for(chat.communicate("\n".join(lines).encode() + b"\n"), 60)
    stdout, stderr = out.decode(), err.decode()
    assert chat.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert "INVALID_ARGUMENT: content contains a control character (U+0001) at offset 4" in stderr
    # The first /history shows the one turn so far; the one after /new, none.
    assert stdout.count("[0] you: hello there") == 1 and "[1] you:" not in stdout
    async with fleet.client() as client:
        sessions = {s.session_id: s for s in await client.list_sessions()}
        histories = [[t.user for t in (await client.get_session(sid)).turns] for sid in sessions]
    assert sorted(histories) == [["fresh"], ["hello there", "still here?"]]


async def test_ctrl_c_stops_the_reply_not_the_program(fleet: Fleet) -> None:
    # Slowed down 20x: the reply is still streaming when Ctrl-C comes.
    await fleet.start({"cli-2": ("us-east", 2000)}, time_scale=20.0, gateway_overrides={"rate_limits": None})
    worker = fleet.workers["cli-2"]
    chat = await _chat(fleet, "--max-tokens", "200")
    assert chat.stdin is not None and chat.stdout is not None
    chat.stdin.write(b"tell me a long story\n")
    await chat.stdin.drain()
    seen = b""
    while len(seen.removeprefix(b"> ")) < 5:  # the prompt, then the reply's first words
        seen += await asyncio.wait_for(chat.stdout.read(64), 30)
    assert worker.engine.stats().running == 1
    chat.send_signal(signal.SIGINT)
    for _ in range(100):  # the turn is cancelled on the worker at once, not run to its end
        if worker.engine.stats().running == 0:
            break
        await asyncio.sleep(0.05)
    assert worker.engine.stats().running == 0
    out, err = await asyncio.wait_for(chat.communicate(b"/history\n/quit\n"), 30)
    stderr = err.decode()
    assert chat.returncode == 0, stderr
    assert "(stopped; /history shows whether the turn was stored)" in stderr and "Traceback" not in stderr
    assert "[0] you:" not in out.decode()
    async with fleet.client() as client:
        (session,) = await client.list_sessions()
        assert len((await client.get_session(session.session_id)).turns) == 0


async def test_ctrl_c_at_the_prompt_leaves(fleet: Fleet) -> None:
    await fleet.start({"cli-3": ("us-east", 2000)})
    chat = await _chat(fleet)
    assert chat.stdout is not None
    assert await asyncio.wait_for(chat.stdout.readexactly(2), 30) == b"> "
    chat.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(chat.communicate(), 30)
    assert chat.returncode == 130 and "Traceback" not in err.decode()
