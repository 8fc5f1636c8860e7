"""A conversation through the real compose fleet: images, networks, healthchecks and all."""

from __future__ import annotations

import subprocess
import sys

from tests.e2e.conftest import WORKERS, ComposeFleet


def kvgate(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvgate.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def test_conversation_streams_through_the_compose_fleet_and_stays_pinned(compose_fleet: ComposeFleet) -> None:
    # --wait rides out the fleet's start-up (workers registering) the way a user would.
    key = ("--api-key", compose_fleet.api_key)
    first = kvgate("chat", "--gateway", compose_fleet.gateway, *key, "--wait", "120", "-v",
                   "--max-tokens", "32", "Hello from the e2e test")  # fmt: skip
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip(), "no reply text streamed"
    summary = first.stderr.strip().splitlines()[-1]
    session_id = summary.split("session ", 1)[1].split(" ", 1)[0]
    worker = summary.split("worker ", 1)[1].split(" ", 1)[0]
    assert worker in WORKERS, summary
    assert "engine sim" in summary and "completion 32" in summary

    second = kvgate(
        "chat", "--gateway", compose_fleet.gateway, *key, "--session", session_id, "-v", "And again?"
    )
    assert second.returncode == 0, second.stderr
    summary2 = second.stderr.strip().splitlines()[-1]
    assert f"worker {worker} " in summary2, (summary, summary2)
    assert "cache hit" in summary2 and "cached 0)" not in summary2


def test_openai_client_chats_through_the_compose_fleet(compose_fleet: ComposeFleet) -> None:
    import openai

    client = openai.OpenAI(base_url=compose_fleet.http_base_url, api_key=compose_fleet.api_key, max_retries=5)
    assert [m.id for m in client.models.list()] == ["llama-3-8b"]
    reply = client.chat.completions.create(
        model="llama-3-8b", messages=[{"role": "user", "content": "hello over HTTP"}], max_tokens=12
    )
    assert reply.choices[0].message.content and reply.usage is not None
    assert reply.usage.completion_tokens == 12
