"""`kvgate status` against a live scheduler: the fleet, pins and outcomes as operators see them."""

from __future__ import annotations

import asyncio
import json
import sys

from tests.integration.fleet import Fleet


async def kvgate(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvgate.cli", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_status_shows_workers_pins_and_placements(fleet: Fleet) -> None:
    await fleet.start({"us-1": ("us-east", 4000), "eu-1": ("eu-west", 2000)})
    async with fleet.client() as client:
        session = await client.create_session()
        await client.reply(session.session_id, "hi", max_tokens=4)
        await client.reply(session.session_id, "again", max_tokens=4)

    code, out, err = await kvgate("status", "--scheduler", fleet.scheduler.address, "--json")
    assert code == 0, err
    status = json.loads(out)
    workers = {w["workerId"]: w for w in status["workers"]}
    assert set(workers) == {"us-1", "eu-1"}
    assert workers["us-1"]["pinnedSessions"] == 1 and workers["us-1"]["region"] == "us-east"
    assert status["placementsByOutcome"] == {"new": "1", "pinned_hit": "1"}

    code, out, err = await kvgate("status", "--scheduler", fleet.scheduler.address, "--once")
    assert code == 0, err
    assert "region us-east" in out and "region eu-west" in out and "us-1" in out


async def test_status_against_no_scheduler_prints_one_line() -> None:
    code, _, err = await kvgate("status", "--scheduler", "127.0.0.1:1", "--once")
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and "127.0.0.1:1" in err
