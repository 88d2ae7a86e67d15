"""vLLM's KV-cache events, in the block hashes routers use (precise prefix routing).

vLLM publishes BlockStored / BlockRemoved / AllBlocksCleared from its engine
core on a ZMQ PUB socket (`kv_events_config`): in this process for the
in-process engine, over TCP for a remote `vllm serve` (`--kv-events-config`).
The wire is decoded with mirrors of vLLM's structs (below), so a worker that
fronts remote servers needs no vLLM installed. Its block hashes are its own
(seeded, salted), so each stored block is re-hashed here from the token ids
the event carries, chained from its parent's translation (schemas/blocks.py):
the orchestrator hashes a prompt the same way. Changes are netted per block
until the worker's event pump drains them (`KvEventSource`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import msgspec

from cplane.schemas.blocks import chain_hashes
from cplane.workers.engines.base import KvDelta

log = logging.getLogger(__name__)


# Mirrors of vllm.distributed.kv_events (0.11 - 0.32): events are msgpack maps
# tagged by class name; unknown fields (medium, lora_name, group_idx...) are
# ignored, so newer vLLMs decode as long as these fields keep their meaning.
class _Event(msgspec.Struct, tag=True):
    pass


class BlockStored(_Event):
    block_hashes: list[Any]
    token_ids: list[int]
    block_size: int
    parent_block_hash: Any = None  # a map: the order of fields is free


class BlockRemoved(_Event):
    block_hashes: list[Any]


class AllBlocksCleared(_Event):
    pass


class KVEventBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


class KvTranslator:
    """vLLM's block hashes -> ours; the blocks the engine holds; netted changes."""

    def __init__(self) -> None:
        self._ours: dict[Any, int] = {}  # vLLM block hash -> our hash
        self._count: dict[int, int] = {}  # our hash -> vLLM blocks with it (LoRA, salts)
        self._changes: dict[int, bool] = {}
        self._cleared = False
        self.unknown_parents = 0  # stored blocks whose parent we never saw (skipped)

    def stored(self, hashes: list[Any], parent: Any, token_ids: list[int],
               block_size: int) -> None:
        ours = 0
        if parent is not None:
            found = self._ours.get(parent)
            if found is None:
                self.unknown_parents += len(hashes)
                return
            ours = found
        for i, engine_hash in enumerate(hashes):
            block = token_ids[i * block_size:(i + 1) * block_size]
            if len(block) < block_size:
                break
            known = self._ours.get(engine_hash)
            if known is not None:  # stored again: already counted
                ours = known
                continue
            ours = chain_hashes(block, block_size, ours)[0]
            self._ours[engine_hash] = ours
            n = self._count.get(ours, 0)
            self._count[ours] = n + 1
            if n == 0:
                self._changes[ours] = True

    def removed(self, hashes: list[Any]) -> None:
        for engine_hash in hashes:
            ours = self._ours.pop(engine_hash, None)
            if ours is None:
                continue
            n = self._count.get(ours, 0) - 1
            if n > 0:
                self._count[ours] = n
            else:
                self._count.pop(ours, None)
                self._changes[ours] = False

    def cleared(self) -> None:
        self._ours.clear()
        self._count.clear()
        self._changes.clear()
        self._cleared = True

    def apply(self, batch: Any) -> None:
        """One vLLM KVEventBatch."""
        for ev in batch.events:
            if isinstance(ev, BlockStored):
                self.stored(list(ev.block_hashes), ev.parent_block_hash, list(ev.token_ids),
                            ev.block_size)
            elif isinstance(ev, BlockRemoved):
                self.removed(list(ev.block_hashes))
            elif isinstance(ev, AllBlocksCleared):
                self.cleared()

    def drain(self) -> KvDelta | None:
        changes, self._changes = self._changes, {}
        cleared, self._cleared = self._cleared, False
        if not changes and not cleared:
            return None
        return KvDelta([h for h, held in changes.items() if held],
                       [h for h, held in changes.items() if not held], cleared)

    def blocks(self) -> list[int]:
        return list(self._count)


class ZmqKvEvents:
    """Reads vLLM's event socket on the worker's loop and feeds a KvTranslator."""

    def __init__(self, endpoint: str, translator: KvTranslator) -> None:
        self.endpoint = endpoint
        self.translator = translator
        self._task: asyncio.Task[None] | None = None
        self.last_seq = -1
        self.gaps = 0

    def start(self) -> None:
        import zmq
        import zmq.asyncio

        ctx = zmq.asyncio.Context.instance()
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(self.endpoint)
        decoder = msgspec.msgpack.Decoder(type=KVEventBatch)

        async def read() -> None:
            try:
                while True:
                    _topic, seq_bytes, payload = await sock.recv_multipart()
                    seq = int.from_bytes(seq_bytes, "big", signed=True)
                    if self.last_seq >= 0 and seq != self.last_seq + 1:
                        # Missed batches: what we hold may be wrong; start over
                        # from what comes next (routers resync from the clear).
                        self.gaps += 1
                        self.translator.cleared()
                    self.last_seq = seq
                    try:
                        self.translator.apply(decoder.decode(payload))
                    except Exception as exc:
                        log.warning("undecodable vLLM KV event batch: %s", exc)
            finally:
                sock.close(linger=0)

        self._task = asyncio.create_task(read(), name="vllm-kv-events")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


__all__ = ["KvTranslator", "ZmqKvEvents"]
