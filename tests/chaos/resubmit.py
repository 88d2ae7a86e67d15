"""Resubmissions: finished request ids published again once their duplicate windows passed.

With the duplicate windows of LLM_REQ / LLM_WORK / LLM_OUT / LLM_DONE scaled
down to `dup_window_s` (10 s), a few finished request ids are published
again, body and Nats-Msg-Id unchanged, once their window has passed (at 60%
and when the load is done: faults.py schedules the first batch, the run the
second), through the tenant that published them first. Expected: the
stored terminal comes back once on the tenant's `llm.done.i.<id>` (what a
README client, subscribed there, waits for; `llm.done.<tenant>.i.<id>` where
the recorder reads it), nothing else. No terminal within `resubmit_wait_s` counts as `hung`; a
terminal other than the stored one counts in `dup_terminals`.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

from tests.chaos.config import ChaosConfig
from tests.chaos.ledger import Recorder, Seen
from tests.chaos.load import Publisher


class RunView(Protocol):
    """What the resubmissions use of the run (scenario.Run); `pub` is set once the load starts."""

    cfg: ChaosConfig
    rng: random.Random
    rec: Recorder
    counts: Counter[str]
    pub: Publisher | None

    def log(self, what: str) -> None: ...


@dataclass
class Resubmission:
    rid: str
    at: float = 0.0  # wall time of the publish
    ack: str = ""  # Publisher.publish_again's answer
    # returned | returned_twice | different | silent | not_accepted; "late ..." when the
    # first answer came after resubmit_wait_s (seen by the books)
    outcome: str = "pending"
    wait_s: float = 0.0  # publish to the first live terminal copy
    copies_before: int = 0  # live terminal copies seen before the publish
    keys_before: set[str] = field(default_factory=set)  # distinct terminals before

    def settle(self, seen: Seen) -> None:
        """The final word, at the books: later copies, and terminals seen only stored."""
        new = set(seen.terminals) - self.keys_before
        if self.outcome == "silent" and (seen.live_copies > self.copies_before or new):
            self.outcome = "late different" if new else "late returned"
        elif self.outcome.startswith("returned") and new:
            self.outcome = "different"


class Resubmitter:
    """Publishes finished ids again, in the background, and records what came back."""

    def __init__(self, run: RunView) -> None:
        self.run = run
        self.cfg, self.rng, self.rec, self.counts, self.log = (
            run.cfg, run.rng, run.rec, run.counts, run.log)
        self.bg: set[asyncio.Task[Any]] = set()  # resubmissions
        self.resubmits: dict[str, Resubmission] = {}

    def batch(self, k: int) -> None:
        """Publishes up to `k` finished ids again (each in a background task)."""
        pub = self.run.pub
        assert pub is not None
        # every duplicate window passed: since its publish (LLM_REQ), its dispatch
        # (LLM_WORK) and its terminal (LLM_OUT / LLM_DONE)
        now, wall, window = time.monotonic(), time.time(), self.cfg.dup_window_s + 2.0
        done = [rid for rid, at in pub.accepted.items()
                if at and now - at > window and rid in pub.bodies and rid not in self.resubmits
                and wall - self.rec.final_live_at.get(rid, wall) > window]
        for rid in self.rng.sample(sorted(done), min(k, len(done))):
            self.resubmits[rid] = Resubmission(rid)
            task = asyncio.create_task(self._resubmit(rid))
            self.bg.add(task)
            task.add_done_callback(self.bg.discard)
        self.log(f"resubmitting {min(k, len(done))} finished ids (of {len(done)} eligible)")

    async def _resubmit(self, rid: str) -> None:
        assert self.run.pub is not None
        r = self.resubmits[rid]
        seen = self.rec.by_id[rid]
        before_copies, before = seen.live_copies, set(seen.terminals)
        r.copies_before, r.keys_before = before_copies, before
        r.at = time.time()
        r.ack = await self.run.pub.publish_again(rid)
        self.log(f"resubmitted {rid}: {r.ack}")
        if r.ack != "accepted":
            r.outcome = "not_accepted"
            return
        self.counts["resubmitted"] += 1
        deadline = time.monotonic() + self.cfg.resubmit_wait_s
        while seen.live_copies == before_copies and time.monotonic() < deadline:
            await asyncio.sleep(0.1)  # poll the recorder for a terminal (bounded by the wait)
        if seen.live_copies == before_copies:
            r.outcome = "silent"
        else:
            r.wait_s = time.time() - r.at
            # a second copy, if one comes, comes right behind the first
            settle = time.monotonic() + 3.0
            while time.monotonic() < settle and seen.live_copies - before_copies < 2:
                await asyncio.sleep(0.1)  # poll for a repeated copy (bounded: 3 s)
            if set(seen.terminals) != before:
                r.outcome = "different"
            elif seen.live_copies - before_copies > 1:
                r.outcome = "returned_twice"
            else:
                r.outcome = "returned"
        self.log(f"resubmission of {rid}: {r.outcome} ({r.wait_s:.2f}s)")

    async def settle(self) -> None:
        """The second batch (the load is done: their windows passed), then every answer."""
        if self.cfg.resubmit:
            self.batch(self.cfg.resubmit - len(self.resubmits))
        if self.bg:
            # each ends within its publish retry (20 s) + resubmit_wait_s + 3 s
            await asyncio.wait(list(self.bg), timeout=30 + self.cfg.resubmit_wait_s)

    async def cancel(self) -> None:
        """Stops the resubmissions still waiting for an answer."""
        for t in list(self.bg):
            t.cancel()
        await asyncio.gather(*self.bg, return_exceptions=True)
