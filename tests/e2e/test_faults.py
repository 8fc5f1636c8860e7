"""Fault injection on the real compose fleet: what a user sees while a worker is SIGKILLed, a
region is cut off, Redis is SIGKILLed and restarted, the broker stops, a gateway and a scheduler replica die,
every worker restarts in turn, and the fleet is full. Each test fills one row of the summary
table printed at the end of the run (tests/e2e/conftest.py).

They run in this order on one fleet; the last one shrinks every worker's KV cache."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import grpc
import pytest

from gateway.client import ChatClient
from gateway.loadgen import LoadConfig, run_load
from gateway.loadgen_report import OK, LoadReport
from gpu_worker.sim.tokenizer import SimTokenizer
from tests.e2e.conftest import WORKERS, ComposeFleet, FaultRow

TOKENIZER = SimTokenizer()
# Workers publish with a 5 s MQTT keepalive: the broker declares one gone after 1.5x that.
MQTT_KEEPALIVE_S = 5.0


def _load(fleet: ComposeFleet, rate: float, seed: int, max_tokens: int = 48) -> LoadConfig:
    """Open-loop multi-turn chat through the load balancer with an enterprise key (no rate
    limits in the way); long enough to outlast any fault, stopped by the test."""
    return LoadConfig(
        trace="synthetic",
        gateway=fleet.gateway,
        api_key=fleet.keys["enterprise"],
        rate=rate,
        duration_s=600,
        max_tokens=max_tokens,
        max_prompt_tokens=3000,
        retries=4,
        timeout_s=120,
        seed=seed,
    )


async def _under_load(
    fleet: ComposeFleet,
    rate: float,
    seed: int,
    fault: Callable[[], Awaitable[None]],
    max_tokens: int = 48,
) -> LoadReport:
    """Run load, inject the fault once the load is flowing, stop issuing when it is over, and
    return the report."""
    stop = asyncio.Event()
    config = _load(fleet, rate, seed, max_tokens)
    load = asyncio.create_task(run_load(config, stop=stop, progress_interval_s=3600))
    await asyncio.sleep(4)
    try:
        await fault()
        await asyncio.sleep(3)
    finally:
        stop.set()
    return await load


async def _lost_turns(fleet: ComposeFleet, report: LoadReport) -> int:
    """Acknowledged turns whose stored history differs from what the client was streamed."""
    lost = 0
    by_session: dict[str, list[tuple[int, str]]] = {}
    for record in report.ok:
        assert record.turn_index is not None
        by_session.setdefault(record.session_id, []).append((record.turn_index, record.text))
    async with ChatClient(fleet.gateway, api_key=fleet.keys["enterprise"]) as client:
        for session_id, turns in by_session.items():
            stored = (await client.get_session(session_id)).turns
            lost += sum(1 for index, text in turns if index >= len(stored) or stored[index].assistant != text)
    return lost


def _fill_row(row: FaultRow, report: LoadReport, lost: int, note: str = "") -> None:
    row.requests = len([r for r in report.records if r.outcome])
    row.errors = len([r for r in report.records if r.outcome.startswith("error")])
    row.resumed = len([r for r in report.ok if r.resumed])
    row.lost_turns = lost
    retried = sum(r.retries for r in report.records)
    row.note = f"{note}; client retries {retried}" if note else f"client retries {retried}"


def _assert_clean(report: LoadReport) -> None:
    errors = [
        (r.outcome, r.worker_id, r.shed_reason, r.pushback_ms, round(r.issued_s, 1))
        for r in report.records
        if r.outcome and r.outcome != OK
    ]
    assert not errors, (
        f"client-visible failures (outcome, worker, shed reason, pushback, issued at s): {errors}"
    )
    mismatches = [r.index for r in report.ok if r.text_mismatch]
    assert not mismatches, f"repeated or missing text in requests {mismatches}"


async def test_sigkill_a_worker_mid_stream_20_times(compose_fleet: ComposeFleet, fault_row: FaultRow) -> None:
    fleet = compose_fleet
    kills, resumed, moved, answer = 20, 0, 0, 600
    async with ChatClient(fleet.gateway, api_key=fleet.keys["enterprise"]) as client:
        for i in range(kills):
            session = await client.create_session()
            parts: list[str] = []
            worker, killed, done = "", "", None
            try:
                async for event in client.send(session.session_id, f"tell me long story number {i}", answer):
                    kind = event.WhichOneof("event")
                    if kind == "placement":
                        worker = event.placement.worker_id
                    elif kind == "delta":
                        parts.append(event.delta.text)
                        if len(parts) == 2 and not killed:
                            killed = worker
                            await asyncio.to_thread(fleet.docker, "kill", fleet.container(f"worker-{killed}"))
                    elif kind == "done":
                        done = event.done
                assert killed and done is not None, "the stream ended without a final event"
                text = "".join(parts)
                assert done.usage.completion_tokens == answer == len(TOKENIZER.encode(text)), "text lost"
                stored = (await client.get_session(session.session_id)).turns
                assert stored[-1].assistant == text
                if done.usage.resumed:
                    resumed += 1
                    # The conversation now lives where it was finished.
                    assert stored[-1].worker_id != killed
                # Its next turn cannot go to the dead worker, pinned or not.
                _, _, placement = await client.reply(session.session_id, "and then?", 8)
                assert placement.worker_id != killed
                moved += 1
            finally:
                if killed:  # the orchestrator's part: `docker kill` is a manual stop for Docker
                    await asyncio.to_thread(fleet.docker, "start", fleet.container(f"worker-{killed}"))
                    await asyncio.to_thread(fleet.wait_for_states, {killed: "ready"})
    fault_row.requests, fault_row.resumed = 2 * kills, resumed
    fault_row.note = f"{kills} kills; next turn elsewhere {moved}/{kills}"
    # The kill lands after the second delta of a 600-token answer: nearly always mid-answer (it
    # can miss when the gateway already relayed the whole answer and the client has not read it).
    assert resumed >= kills * 3 // 4, f"only {resumed}/{kills} streams were resumed"


async def test_a_region_cut_off_for_30_s(compose_fleet: ComposeFleet, fault_row: FaultRow) -> None:
    fleet = compose_fleet
    region = "ap-south"
    cut = [w for w in WORKERS if w.startswith(region)]
    network = f"{fleet.project}_region-{region}"
    offline_after: list[float] = []
    cut_window: list[float] = []

    async def reconnect() -> None:
        for w in cut:
            worker = fleet.container(f"worker-{w}")
            attached = await asyncio.to_thread(
                fleet.docker, "inspect", "-f", "{{json .NetworkSettings.Networks}}", worker
            )
            if network not in attached:
                # The compose service name is the address the gateways and schedulers use.
                await asyncio.to_thread(
                    fleet.docker, "network", "connect", "--alias", f"worker-{w}", network, worker
                )

    async def cut_region() -> None:
        t0 = time.monotonic()
        try:
            for w in cut:
                worker = fleet.container(f"worker-{w}")
                await asyncio.to_thread(fleet.docker, "network", "disconnect", network, worker)
            offline = dict.fromkeys(cut, "offline")
            offline_after.append(await asyncio.to_thread(fleet.wait_for_states, offline, 60))
            cut_window.append(time.monotonic())
            await asyncio.sleep(max(0.0, 30 - (time.monotonic() - t0)))
            cut_window.append(time.monotonic())
        finally:
            await reconnect()
        await asyncio.to_thread(fleet.wait_for_states, dict.fromkeys(cut, "ready"), 90)

    run_started = time.monotonic()
    report = await _under_load(fleet, rate=3, seed=2, fault=cut_region)
    lost = await _lost_turns(fleet, report)
    # Placed while the scheduler knew the region was gone: nothing went there.
    window = (cut_window[0] - run_started, cut_window[1] - run_started)
    placed_in_cut = [r for r in report.ok if window[0] + 1 <= r.issued_s <= window[1] and r.region == region]
    _fill_row(fault_row, report, lost, f"offline after {offline_after[0]:.1f} s")
    _assert_clean(report)
    assert lost == 0
    # The broker's last-will after 1.5 x keepalive, the ingest's 1 s confirmation, and slack
    # for a busy machine (status polls spawn docker-compose).
    assert offline_after[0] <= 1.5 * MQTT_KEEPALIVE_S + 1 + 7, "the broker's last-will came too late"
    assert not placed_in_cut, (
        f"placed in the cut-off region: {[(r.index, r.worker_id) for r in placed_in_cut]}"
    )
    assert any(window[0] <= r.issued_s <= window[1] for r in report.ok), "no load during the cut"


async def test_redis_crash_loses_no_acknowledged_turn(
    compose_fleet: ComposeFleet, fault_row: FaultRow
) -> None:
    fleet = compose_fleet
    async with ChatClient(fleet.gateway, api_key=fleet.keys["enterprise"]) as client:
        sessions = [(await client.create_session()).session_id for _ in range(5)]
        for turn in range(3):
            for session_id in sessions:
                await client.reply(session_id, f"turn {turn} of a conversation Redis must keep", 16)
        before = {s: list((await client.get_session(s)).turns) for s in sessions}

        # SIGKILL, not a clean shutdown: acknowledged turns must survive a crash of Redis itself.
        await asyncio.to_thread(fleet.docker, "kill", fleet.container("redis"))
        try:
            # While Redis is down: UNAVAILABLE with a retry hint, for reads and writes alike.
            for call in (client.create_session(), client.get_session(sessions[0])):
                with pytest.raises(grpc.aio.AioRpcError) as failure:
                    await call
                assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
                trailing = dict(failure.value.trailing_metadata() or ())
                assert int(trailing["grpc-retry-pushback-ms"]) > 0
        finally:
            await asyncio.to_thread(fleet.docker, "start", fleet.container("redis"))
        await asyncio.to_thread(fleet.wait_healthy, "redis")

        # Nothing else restarted: the gateways and schedulers reconnect by themselves.
        deadline = time.monotonic() + 60
        while True:
            try:
                after = {s: list((await client.get_session(s)).turns) for s in sessions}
                _, done, _ = await client.reply(sessions[0], "still there?", 8)
                break
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(1)
    lost = sum(1 for s in sessions for a, b in zip(before[s], after[s], strict=True) if a != b)
    lost += sum(max(0, len(before[s]) - len(after[s])) for s in sessions)
    fault_row.requests, fault_row.lost_turns = 5 * 3 + 1, lost
    fault_row.note = "UNAVAILABLE + pushback while down; recovered without restarts"
    assert lost == 0 and done.turn_index == 3


async def test_mosquitto_stopped_for_30_s(compose_fleet: ComposeFleet, fault_row: FaultRow) -> None:
    fleet = compose_fleet
    states_during: list[dict[str, str]] = []
    resumed_after: list[float] = []

    async def stop_broker() -> None:
        await asyncio.to_thread(fleet.docker, "stop", fleet.container("mosquitto"))
        try:
            for _ in range(3):
                await asyncio.sleep(10)
                states_during.append(await asyncio.to_thread(fleet.worker_states))
        finally:
            await asyncio.to_thread(fleet.docker, "start", fleet.container("mosquitto"))
        t0 = time.monotonic()
        while True:
            status = await asyncio.to_thread(fleet.fleet_status)
            ages = [w.get("lastSeenAgeS", 0.0) for w in status["workers"]]
            if all(age < 2 for age in ages) and all(w["state"] == "ready" for w in status["workers"]):
                resumed_after.append(time.monotonic() - t0)
                return
            assert time.monotonic() - t0 < 60, f"telemetry did not resume: {status['workers']}"
            await asyncio.sleep(1)

    report = await _under_load(fleet, rate=3, seed=4, fault=stop_broker)
    lost = await _lost_turns(fleet, report)
    _fill_row(fault_row, report, lost, f"telemetry back {resumed_after[0]:.1f} s after restart")
    _assert_clean(report)
    assert lost == 0
    # No telemetry for 30 s is not taken for 30 s of dead workers.
    for states in states_during:
        assert all(states.get(w) in ("ready", "stale") for w in WORKERS), states_during


async def test_kill_one_gateway_and_one_scheduler_replica(
    compose_fleet: ComposeFleet, fault_row: FaultRow
) -> None:
    fleet = compose_fleet

    async def kill_replicas() -> None:
        # The load runs on one client connection, which the balancer gave to one gateway: kill
        # each pair in turn so the connection in use surely dies once.
        for n in (1, 2):
            victims = [fleet.container(f"gateway-{n}"), fleet.container(f"scheduler-{n}")]
            await asyncio.to_thread(fleet.docker, "kill", *victims)
            try:
                await asyncio.sleep(8)
            finally:
                await asyncio.to_thread(fleet.docker, "start", *victims)
            await asyncio.to_thread(fleet.wait_healthy, f"gateway-{n}", f"scheduler-{n}")

    # Long answers keep several streams open on the connection whenever a gateway dies.
    report = await _under_load(fleet, rate=4, seed=5, fault=kill_replicas, max_tokens=400)
    lost = await _lost_turns(fleet, report)
    _fill_row(fault_row, report, lost, "each gateway+scheduler pair killed for 8 s in turn")
    _assert_clean(report)
    assert lost == 0
    assert sum(r.retries for r in report.records) >= 1, "no request saw a dead gateway"


async def test_rolling_restart_of_every_worker_with_drain(
    compose_fleet: ComposeFleet, fault_row: FaultRow
) -> None:
    fleet = compose_fleet

    async def rolling_restart() -> None:
        for w in WORKERS:
            # SIGTERM: the worker says DRAINING, finishes what it runs, then exits.
            try:
                await asyncio.to_thread(fleet.docker, "stop", "-t", "65", fleet.container(f"worker-{w}"))
            finally:
                await asyncio.to_thread(fleet.docker, "start", fleet.container(f"worker-{w}"))
            await asyncio.to_thread(fleet.wait_for_states, {w: "ready"})

    report = await _under_load(fleet, rate=3, seed=6, fault=rolling_restart)
    lost = await _lost_turns(fleet, report)
    _fill_row(fault_row, report, lost, f"{len(WORKERS)} workers restarted")
    _assert_clean(report)
    assert lost == 0


def _message(tokens: int) -> str:
    """A user message of `tokens` sim tokens whose gateway estimate (chars / 4) is the same."""
    return " ".join(["abc"] * tokens)


async def test_a_full_fleet_sheds_free_tier_first(compose_fleet: ComposeFleet, fault_row: FaultRow) -> None:
    fleet = compose_fleet
    # Tiny KV caches (64 blocks = 1,024 tokens a worker) and a 20x slower engine, so a few long
    # conversations fill the fleet and stay there.
    small = {"KVGATE_NUM_GPU_BLOCKS": "64", "KVGATE_TIME_SCALE": "20"}
    await asyncio.to_thread(
        fleet.compose, "up", "-d", "--no-deps", *(f"worker-{w}" for w in WORKERS), env=small, timeout=300
    )
    fleet.forget_containers()
    await asyncio.to_thread(fleet.wait_for_states, dict.fromkeys(WORKERS, "ready"), 120)

    async def one_turn(tier: str, content: str, max_tokens: int) -> grpc.StatusCode | str:
        async with ChatClient(fleet.gateway, api_key=fleet.keys[tier]) as client:
            session = await client.create_session()
            try:
                _, _, placement = await client.reply(session.session_id, content, max_tokens)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    pushback = dict(exc.trailing_metadata() or ()).get("grpc-retry-pushback-ms")
                    assert pushback is not None and int(pushback) > 0, "shed without a retry hint"
                    assert "capacity" in (exc.details() or "")
                return exc.code()
            return placement.worker_id

    # One long enterprise conversation per worker: a 900-token prompt (57 blocks with the chat
    # template) leaves 112 tokens minus what it has generated so far free: room for a ~20-token
    # enterprise turn, not for a free-tier one, which must leave 10% (102 tokens) free as well.
    fillers = [asyncio.create_task(one_turn("enterprise", _message(900), 110)) for _ in WORKERS]
    await asyncio.sleep(3)  # prefilled and accounted for by the workers' telemetry
    try:
        free = [await one_turn("free", _message(8), 8) for _ in range(3)]
        enterprise = [await one_turn("enterprise", _message(8), 8) for _ in range(3)]
    finally:
        filled = await asyncio.gather(*fillers)
        for task in fillers:
            with contextlib.suppress(asyncio.CancelledError):
                task.cancel()
    fault_row.requests = len(fillers) + len(free) + len(enterprise)
    fault_row.errors = sum(1 for r in (*filled, *enterprise) if isinstance(r, grpc.StatusCode))
    fault_row.note = f"free tier: {[getattr(r, 'name', 'served') for r in free]}"
    assert all(isinstance(r, str) for r in filled), filled
    assert free == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3, free
    assert all(isinstance(r, str) for r in enterprise), enterprise
