"""A coroutine on a thread of its own, with asyncio's own event loop: where MQTT runs.

Service processes run on uvloop (less CPU per RPC and per streamed chunk), but aiomqtt (paho's
socket callbacks) misbehaves on uvloop when the broker goes away: uvloop raises in paho's
add_writer on the closed socket and the disconnect is noticed only at the keepalive, 10 s later
(the e2e broker-outage test shed turns because the scheduler's telemetry clock kept ticking
meanwhile). So each process's MQTT client lives here instead, on asyncio's selector loop, and
talks to the main loop only through thread-safe calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger(__name__)

RECANCEL_S = 0.5


class LoopThread:
    """Runs `main()` on a daemon thread's asyncio loop until it returns or stop() cancels it."""

    def __init__(self, name: str, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self._name = name
        self._main = main
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self._name)
        self._thread.daemon = True  # never keeps a stopping process alive
        self._thread.start()

    def _run(self) -> None:
        with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
            runner.run(self._guarded())

    async def _guarded(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        try:
            # A stop() that came before the task was set found nothing to cancel: it left this.
            if not self._stopping:
                await self._main()
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("%s died", self._name)
        finally:
            # A paho client that lost its connection uncleanly sits in a reference cycle with
            # aiomqtt's; collected after this loop closes, its __del__ closes the socket through
            # call_soon_threadsafe on the closed loop and raises. Finalise it while the loop runs.
            gc.collect()
            await asyncio.sleep(0)

    def call_soon(self, callback: Callable[[], object]) -> None:
        """Run callback on this thread's loop (from any thread); dropped once the loop is gone."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # its loop already closed
                loop.call_soon_threadsafe(callback)

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Cancel main() (it may clean up in `finally`) and wait for the thread, up to timeout_s.
        The cancellation is repeated every RECANCEL_S: a library under main() may take one for an
        error of its own and carry on (aiomqtt turns it into an MqttError on disconnect)."""
        self._stopping = True
        deadline = time.monotonic() + timeout_s
        while True:
            task = self._task
            if task is not None:
                self.call_soon(task.cancel)
            left = deadline - time.monotonic()
            await self.join(min(RECANCEL_S, max(0.0, left)), warn=False)
            if self._thread is None or not self._thread.is_alive():
                return
            if left <= RECANCEL_S:
                log.warning("%s did not stop within %.0fs", self._name, timeout_s)
                return

    async def join(self, timeout_s: float, warn: bool = True) -> None:
        """Wait for main() to return on its own, up to timeout_s."""
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout_s)
            if warn and self._thread.is_alive():
                log.warning("%s did not stop within %.0fs", self._name, timeout_s)
