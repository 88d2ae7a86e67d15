"""The in-flight signal: which requests' terminals are stored, told to the orchestrators.

One core message `llm.fin.<publisher>` carries the ids (space-separated) of every
terminal its publisher stored since the last one, sent one loop turn after the
first: under load one message covers many requests (a zero-cost worker finishes
dozens per engine step), while a lone request's signal leaves at once. Best
effort by design: a lost signal is healed by the orchestrators' LLM_DONE lookup
(`reconcile_after_s`).
"""

from __future__ import annotations

import asyncio
import contextlib

from nats.aio.client import Client as NATS

# Ids per message: ~64-byte ids keep a signal far below the 1 MB max_payload.
MAX_IDS = 2048


class FinSignals:
    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self._ids: dict[str, list[str]] = {}  # subject -> ids waiting to be told
        self._flush: asyncio.Task[None] | None = None

    def add(self, subject: str, request_id: str) -> None:
        self._ids.setdefault(subject, []).append(request_id)
        if self._flush is None:
            self._flush = asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        try:
            while self._ids:  # ids added while a publish waited go in the next round
                pending, self._ids = self._ids, {}
                for subject, ids in pending.items():
                    for i in range(0, len(ids), MAX_IDS):
                        with contextlib.suppress(Exception):
                            await self.nc.publish(subject,
                                                  " ".join(ids[i:i + MAX_IDS]).encode())
        finally:
            self._flush = None


def fin_ids(subject_token: str, data: bytes) -> list[str]:
    """The request ids a signal names (an empty body names its subject's last token)."""
    return data.decode("ascii", "replace").split() if data else [subject_token]


__all__ = ["MAX_IDS", "FinSignals", "fin_ids"]
