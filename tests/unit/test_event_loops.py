"""Service processes run on uvloop when it is installed (it is a dependency), else on asyncio;
MQTT clients run on a thread of their own with asyncio's loop (aiomqtt misses broker
disconnects on uvloop)."""

from __future__ import annotations

import asyncio
import sys

import pytest

from kvgate.loop_thread import LoopThread
from kvgate.service import run_event_loop


def _loop_class_name_running() -> str:
    seen: list[str] = []

    async def main() -> None:
        seen.append(type(asyncio.get_running_loop()).__module__)

    run_event_loop(main())
    return seen[0]


def test_runs_on_uvloop_when_installed() -> None:
    pytest.importorskip("uvloop")
    assert _loop_class_name_running().startswith("uvloop")


def test_falls_back_to_asyncio_without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes `import uvloop` raise ImportError.
    monkeypatch.setitem(sys.modules, "uvloop", None)
    assert _loop_class_name_running().startswith("asyncio")


def test_loop_thread_runs_asyncio_under_a_uvloop_process_and_stops_on_cancel() -> None:
    pytest.importorskip("uvloop")
    seen: list[str] = []
    cleaned_up: list[bool] = []

    async def mqtt_side() -> None:
        seen.append(type(asyncio.get_running_loop()).__module__)
        try:
            await asyncio.sleep(3600)
        finally:
            cleaned_up.append(True)

    async def main() -> None:
        thread = LoopThread("test-mqtt", mqtt_side)
        thread.start()
        for _ in range(200):
            if seen:
                break
            await asyncio.sleep(0.01)
        seen.append(type(asyncio.get_running_loop()).__module__)
        await thread.stop(timeout_s=5)

    run_event_loop(main())
    assert seen[0].startswith("asyncio") and seen[1].startswith("uvloop")
    assert cleaned_up == [True]


def test_loop_thread_stopped_before_it_ran_never_runs_main() -> None:
    ran: list[bool] = []

    async def never() -> None:
        ran.append(True)

    async def main() -> None:
        thread = LoopThread("test-stop-early", never)
        await thread.stop(timeout_s=1)  # before start: nothing to cancel, nothing to join
        thread.start()
        await thread.join(timeout_s=5)

    asyncio.run(main())
    assert ran == []


def test_services_freeze_their_startup_heap_out_of_the_cyclic_gc() -> None:
    import gc

    from kvgate.service import freeze_startup_heap

    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() > 10_000  # modules, descriptors, grpc: the whole startup heap
    finally:
        gc.unfreeze()
