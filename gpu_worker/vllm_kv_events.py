"""vLLM's KV cache events -> the scheduler's prefix index: subscribe, convert hashes, net changes.

vLLM's engine-core process publishes a KVEventBatch per step on a ZMQ PUB socket (configured by
`kv_events_config_kwargs`); `KvEventSubscriber` drains it without blocking and `KvEventAccumulator`
folds the events into the net stored/removed block hashes since the worker last asked, plus the
set of live hashes behind the num_blocks_cached estimate.  A lost or undecodable batch clears
everything, so the scheduler relearns this worker's prefixes instead of trusting stale ones.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable
from typing import Any

from gpu_worker.engine import KvEventBatch
from gpu_worker.vllm_api import one_line

log = logging.getLogger(__name__)

_U64 = (1 << 64) - 1


def kv_events_config_kwargs(endpoint: str) -> dict[str, Any]:
    """Keyword arguments for vLLM's `KVEventsConfig`: ZMQ PUB bound by the engine-core process.

    An ipc:// endpoint binds (ZmqEventPublisher._is_bind_endpoint) on a private socket file, so
    nothing listens on the network, unlike vLLM's default tcp://*:5557.
    """
    return {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": endpoint, "topic": ""}


def block_hash_to_int(block_hash: int | bytes) -> int:
    """A vLLM block hash (bytes, sha256 by default, or int) -> a stable unsigned 64-bit int.

    Bytes keep their low 64 bits read big-endian, which is exactly vLLM's own conversion when
    VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES is set (v1/core/kv_cache_utils.py maybe_convert_block_hash),
    so both settings of that flag give the same ints.  Ints are masked to 64 bits so negative
    (builtin-hash) values still fit the proto's uint64.
    """
    if isinstance(block_hash, bytes | bytearray | memoryview):
        return int.from_bytes(bytes(block_hash), "big") & _U64
    return int(block_hash) & _U64


class KvEventAccumulator:
    """Folds vLLM KV events into the net change since the last `take()`.

    A KvEventBatch has no order between its lists, so each hash appears at most once, in `stored`
    if it ended up cached or in `removed` if it ended up evicted; `all_cleared` means "forget
    everything you had before this batch's lists".  `live` tracks the currently cached hashes
    for the num_blocks_cached estimate.
    """

    def __init__(self) -> None:
        self._net: dict[int, bool] = {}  # hash -> True stored / False removed, insertion-ordered
        self._all_cleared = False
        self._last_seq: int | None = None
        self.live: set[int] = set()

    def apply(self, events: Iterable[Any]) -> None:
        # Dispatch on the class name so fakes in the unit tests and vLLM's msgspec structs
        # (vllm/distributed/kv_events.py BlockStored / BlockRemoved / AllBlocksCleared) both fit.
        for event in events:
            kind = type(event).__name__
            if kind == "AllBlocksCleared":
                self.clear()
                continue
            if kind not in ("BlockStored", "BlockRemoved"):
                continue
            # With CPU offloading vLLM also reports blocks in CPU/storage tiers; only the GPU
            # cache (medium None on older vLLM) is capacity this worker can serve from.
            medium = getattr(event, "medium", None)
            if medium not in (None, "GPU"):
                continue
            present = kind == "BlockStored"
            for raw in getattr(event, "block_hashes", ()):
                h = block_hash_to_int(raw)
                self._net.pop(h, None)  # re-insert so the newest state wins and stays last
                self._net[h] = present
                if present:
                    self.live.add(h)
                else:
                    self.live.discard(h)

    def clear(self) -> None:
        self._net.clear()
        self.live.clear()
        self._all_cleared = True

    def note_seq(self, seq: int) -> bool:
        """Record a publisher sequence number; a gap (dropped batches) forces a clear.

        Clearing is the safe recovery: the scheduler forgets this worker's prefixes and relearns
        them from new events instead of routing to blocks that may be long gone.
        """
        gap = (self._last_seq is None and seq != 0) or (
            self._last_seq is not None and seq != self._last_seq + 1
        )
        self._last_seq = seq
        if gap:
            self.clear()
        return gap

    def take(self) -> KvEventBatch:
        batch = KvEventBatch(
            stored=[h for h, present in self._net.items() if present],
            removed=[h for h, present in self._net.items() if not present],
            all_cleared=self._all_cleared,
        )
        self._net = {}
        self._all_cleared = False
        return batch


class KvEventSubscriber:
    """SUB side of vLLM's ZmqEventPublisher: frames are (topic, seq: 8-byte big-endian, msgpack
    KVEventBatch).  Drained without blocking whenever the worker asks for events or stats."""

    def __init__(self, endpoint: str, event_batch_type: Any) -> None:
        # vLLM's own dependencies, so present whenever vLLM is; Any because kvgate has no stubs.
        msgpack: Any = importlib.import_module("msgspec.msgpack")
        zmq: Any = importlib.import_module("zmq")

        self._zmq = zmq
        self._decoder: Any = msgpack.Decoder(type=event_batch_type)
        self._ctx: Any = zmq.Context()
        self._sock: Any = self._ctx.socket(zmq.SUB)
        # vLLM publishes one message per engine step; keep ~minutes of steps between drains
        # rather than ZMQ's default 1000, beyond which messages are dropped (a seq gap).
        self._sock.setsockopt(zmq.RCVHWM, 100_000)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        # Connecting before the engine-core process binds is fine (ZMQ reconnects), and avoids
        # missing the first batches.
        self._sock.connect(endpoint)

    def drain(self, acc: KvEventAccumulator) -> None:
        zmq = self._zmq
        while True:
            try:
                frames = self._sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 3:
                continue
            _topic, seq_bytes, payload = frames
            acc.note_seq(int.from_bytes(seq_bytes, "big", signed=True))
            try:
                batch = self._decoder.decode(payload)
            except Exception as e:  # a format change in vLLM: lose the batch, not the worker
                log.warning("undecodable vLLM KV event batch: %s", one_line(e))
                acc.clear()
                continue
            acc.apply(getattr(batch, "events", ()))

    def close(self) -> None:
        self._sock.close(linger=0)
        self._ctx.term()
