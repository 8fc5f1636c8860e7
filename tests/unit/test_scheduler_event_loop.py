"""Service processes run on uvloop when it is installed (it is a dependency), else on asyncio;
processes that speak MQTT always on asyncio (aiomqtt misses broker disconnects on uvloop)."""

from __future__ import annotations

import asyncio
import sys

import pytest

from kvgate.service import run_event_loop


def _loop_class_name_running(mqtt: bool = False) -> str:
    seen: list[str] = []

    async def main() -> None:
        seen.append(type(asyncio.get_running_loop()).__module__)

    run_event_loop(main(), mqtt=mqtt)
    return seen[0]


def test_runs_on_uvloop_when_installed() -> None:
    pytest.importorskip("uvloop")
    assert _loop_class_name_running().startswith("uvloop")


def test_falls_back_to_asyncio_without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes `import uvloop` raise ImportError.
    monkeypatch.setitem(sys.modules, "uvloop", None)
    assert _loop_class_name_running().startswith("asyncio")


def test_mqtt_processes_run_on_asyncio() -> None:
    assert _loop_class_name_running(mqtt=True).startswith("asyncio")
