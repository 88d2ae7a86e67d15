"""The in-flight signal: which requests' terminals are stored, told to the orchestrators.

One core message `llm.fin.<publisher>` (a `schemas.messages.Fin`) names every
terminal its publisher stored since the last one, with each request's TTFT,
sent one loop turn after the first: under load one message covers many
requests (a zero-cost worker finishes dozens per engine step), while a lone
request's signal leaves at once. Best effort by design: a lost signal is
healed by the orchestrators' LLM_DONE lookup (`reconcile_after_s`).
"""

from __future__ import annotations

import asyncio
import contextlib

import msgspec
from nats.aio.client import Client as NATS

from cplane.schemas.codec import encode, fin_decoder
from cplane.schemas.messages import Fin, Finished

# Terminals per message: ~80 bytes each keeps a signal far below the 1 MB max_payload.
MAX_IDS = 2048


class FinSignals:
    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self._done: dict[str, list[Finished]] = {}  # subject -> terminals waiting to be told
        self._flush: asyncio.Task[None] | None = None

    def add(self, subject: str, request_id: str, ttft_ms: float = -1.0) -> None:
        self._done.setdefault(subject, []).append(Finished(request_id, ttft_ms))
        if self._flush is None:
            self._flush = asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        try:
            while self._done:  # terminals added while a publish waited go in the next round
                pending, self._done = self._done, {}
                for subject, done in pending.items():
                    for i in range(0, len(done), MAX_IDS):
                        with contextlib.suppress(Exception):
                            await self.nc.publish(subject,
                                                  encode(Fin(done=done[i:i + MAX_IDS])))
        finally:
            self._flush = None


def read_fin(data: bytes) -> list[Finished]:
    """The terminals a signal names; nothing for a body that is not a `Fin`."""
    try:
        return fin_decoder.decode(data).done
    except (msgspec.DecodeError, msgspec.ValidationError):
        return []


__all__ = ["MAX_IDS", "FinSignals", "read_fin"]
