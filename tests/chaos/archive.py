"""The harness's own copy of LLM_OUT: a durable pull consumer that reads it from the start.

LLM_OUT keeps chunks only `out_max_age_s` in a run (seconds), yet the books
need everything it stored (ledger.py: `gaps`, `inconsistent`). The harness
used to keep a server-side mirror of LLM_OUT for that; on a 3-node cluster
the mirror skipped messages during node faults (holes counted as
`num_deleted` on a stream that deletes nothing, while LLM_OUT held them and
its next worker read them back), and the books counted gaps the product had
not made. So the harness now reads LLM_OUT itself, as a client would:

- a durable pull consumer (`chaos-archive`: every subject, deliver all,
  explicit acks, the stream's replicas) made as soon as LLM_OUT exists,
  before the first request is published;
- `OutArchive` fetches it in batches on a connection of its own and acks a
  message once it is kept (in memory, by stream sequence). A delivery that is
  lost (a leader change, a reconnect, a paused node) is not acked, so the
  server delivers it again after `ack_wait_s`; what the consumer delivered
  and what was acked is replicated with it, so a new leader of LLM_OUT goes on
  from there. A consumer gone (deleted, or its stream made again) is made
  again, from what LLM_OUT still holds;
- `settle` (the books, after the drain) waits until every sequence LLM_OUT
  now holds is kept, then stops. What was never kept is a `hole`: a sequence
  below LLM_OUT's first at the end aged out before the archive read it (the
  archive was more than max_age behind); one inside its range LLM_OUT does
  not hold (or the archive never got within the wait). The report says so,
  and how far behind LLM_OUT the archive read (`max_lag_s`: store time to
  the archive's receipt, the same machine's clock): a gap next to archive
  holes may be the harness's, one without is the product's.

The old mirror stays beside it as an observation only (`MIRROR`: nothing
reads it for a figure): the report counts the sequences it skipped that the
archive holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from cplane.bus.tasks import cancel_all

OUT = "LLM_OUT"
MIRROR = "CHAOS_OUT_MIRROR"  # a server-side mirror of LLM_OUT: observed, never read for a figure
CONSUMER = "chaos-archive"
BATCH = 1000


def _ranges(seqs: list[int], limit: int = 8) -> str:
    """Sorted seqs as `a-b` runs, the first `limit` of them."""
    runs: list[list[int]] = []
    for s in seqs:
        if runs and s == runs[-1][1] + 1:
            runs[-1][1] = s
        else:
            runs.append([s, s])
    text = ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs[:limit])
    return text + (f",... ({len(runs)} runs)" if len(runs) > limit else "") if runs else "-"


class OutArchive:
    """Every message of LLM_OUT, read through a durable consumer from the run's start."""

    def __init__(self, nc: NATS, log: Callable[[str], None], ack_wait_s: float = 5.0,
                 stream: str = OUT) -> None:
        self.nc, self.log, self.stream, self.ack_wait_s = nc, log, stream, ack_wait_s
        self.js = nc.jetstream(timeout=5.0)
        self.msgs: dict[int, tuple[str, bytes]] = {}  # stream seq -> (subject, data)
        self.redelivered = 0  # deliveries of a seq already kept (a lost ack, a leader change)
        self.conflicts: list[int] = []  # seqs delivered twice with different content
        self.max_lag_s = 0.0  # worst: LLM_OUT's store time -> the archive's receipt
        self.errors: Counter[str] = Counter()  # fetch failures by kind (elections, reconnects)
        self.remade = 0  # times the consumer was found gone and made again (0: never lost)
        self.holes: list[int] = []  # set by settle: LLM_OUT seqs never kept
        self.first_seq = self.last_seq = 0  # LLM_OUT's at settle
        self.settled_in_s: float | None = None  # None: settle ran out of time
        self._psub: Any = None
        self._task: asyncio.Task[None] | None = None

    def _config(self) -> ConsumerConfig:
        return ConsumerConfig(
            durable_name=CONSUMER, name=CONSUMER, deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT, ack_wait=self.ack_wait_s, max_deliver=-1,
            max_ack_pending=-1, num_replicas=0)  # 0: the stream's replicas and peers

    async def _bind(self) -> None:
        """Make the consumer (idempotent while its config is the same) and pull from it."""
        await self.js.add_consumer(self.stream, config=self._config())
        self._psub = await self.js.pull_subscribe_bind(
            durable=CONSUMER, stream=self.stream, pending_msgs_limit=2_000_000,
            pending_bytes_limit=1 << 30)

    async def _still_there(self) -> None:
        """After fetch errors: make the consumer again if it is gone (its pulls go on
        through the same subscription: they name the consumer, not a server)."""
        try:
            await self.js.consumer_info(self.stream, CONSUMER)
            return
        except NotFoundError:
            pass
        except Exception:  # an election: asked again after the next errors
            return
        await self.js.add_consumer(self.stream, config=self._config())
        self.remade += 1
        self.log(f"archive: consumer {CONSUMER} on {self.stream} was gone, made again "
                 f"({self.remade}x; {len(self.msgs)} messages kept)")

    async def start(self, timeout_s: float = 60.0) -> None:
        """Make the consumer (retried through an election, bounded), then read in the background."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                await self._bind()
                break
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise
                self.errors[f"make {type(exc).__name__}"] += 1
                await asyncio.sleep(0.5)  # an election or a consumer group forming (bounded)
        self._task = asyncio.create_task(self._run(), name="out-archive")

    def _keep(self, m: Msg) -> None:
        md = m.metadata
        seq = md.sequence.stream
        old = self.msgs.get(seq)
        if old is None:
            self.msgs[seq] = (m.subject, m.data)
        else:
            self.redelivered += 1
            if old != (m.subject, m.data):
                self.conflicts.append(seq)
        if md.timestamp is not None:
            self.max_lag_s = max(self.max_lag_s, time.time() - md.timestamp.timestamp())

    async def _run(self) -> None:
        last_look = 0.0
        while True:
            try:
                msgs = await self._psub.fetch(BATCH, timeout=1.0)
            except TimeoutError:  # nothing new (or a fetch lost in a reconnect): ask again
                continue
            except Exception as exc:  # an election (503), a deleted consumer (409): ask again
                self.errors[type(exc).__name__] += 1
                if time.monotonic() - last_look > 5.0:
                    last_look = time.monotonic()
                    with contextlib.suppress(Exception):
                        await self._still_there()
                await asyncio.sleep(0.5)  # pacing after an error (bounded by the run)
                continue
            for m in msgs:
                if not m.reply:  # a status message, not a stored one
                    continue
                self._keep(m)
                with contextlib.suppress(Exception):  # a lost ack: delivered again, kept once
                    await m.ack()

    async def settle(self, timeout_s: float = 60.0) -> None:
        """Wait (bounded) until every seq LLM_OUT holds now is kept; then stop and count
        the holes (LLM_OUT's seqs from 1 to its last that were never kept)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            try:
                info = await self.js.stream_info(self.stream)
            except Exception as exc:
                self.errors[f"settle {type(exc).__name__}"] += 1
                await asyncio.sleep(0.5)  # poll LLM_OUT's state (bounded by timeout_s)
                continue
            st = info.state
            self.first_seq, self.last_seq = st.first_seq, st.last_seq
            interior = set(st.deleted or ())  # LLM_OUT's own interior holes (if it reports them)
            if all(s in self.msgs or s in interior for s in range(st.first_seq, st.last_seq + 1)):
                self.settled_in_s = time.monotonic() - t0
                break
            if await self._consumer_done(st.last_seq):
                self.settled_in_s = time.monotonic() - t0
                break
            await asyncio.sleep(0.5)  # poll until the archive caught up (bounded by timeout_s)
        await self.stop()
        self.holes = [s for s in range(1, self.last_seq + 1) if s not in self.msgs]
        self.log(f"archive settled: {len(self.msgs)} kept of LLM_OUT 1..{self.last_seq} "
                 f"(first {self.first_seq}), holes {len(self.holes)}")

    async def _consumer_done(self, last_seq: int) -> bool:
        """The consumer has delivered and seen acked everything up to `last_seq` (the rest
        of LLM_OUT's range: seqs it does not hold)."""
        try:
            ci = await self.js.consumer_info(self.stream, CONSUMER)
        except Exception:
            return False
        floor = ci.ack_floor.stream_seq if ci.ack_floor is not None else 0
        return not ci.num_pending and not ci.num_ack_pending and (floor or 0) >= last_seq

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_all([self._task])
            self._task = None
        if self._psub is not None:
            with contextlib.suppress(Exception):
                await self._psub.unsubscribe()
            self._psub = None

    def stored(self) -> list[tuple[int, str, bytes]]:
        """Everything kept, in stream order: (seq, subject, data)."""
        return [(s, *self.msgs[s]) for s in sorted(self.msgs)]

    def report_lines(self, max_age_s: float) -> list[str]:
        below = [s for s in self.holes if s < self.first_seq]
        inside = [s for s in self.holes if s >= self.first_seq]
        return [
            f"archive of LLM_OUT (the harness's durable consumer {CONSUMER}; the books read "
            f"it): {len(self.msgs)} messages of seqs 1..{self.last_seq}; holes "
            f"{len(self.holes)} (aged out of LLM_OUT before the archive read them: "
            f"{len(below)} {_ranges(below)}; in LLM_OUT's range {self.first_seq}.. but "
            f"never delivered: {len(inside)} {_ranges(inside)}); read at most "
            f"{self.max_lag_s:.1f}s after LLM_OUT stored a message (its max_age "
            f"{max_age_s:g}s); redelivered {self.redelivered}; seqs delivered with two "
            f"contents {len(self.conflicts)} {self.conflicts[:5]}; consumer found gone "
            f"and made again {self.remade}x; fetch errors {dict(self.errors)}; caught up "
            + (f"{self.settled_in_s:.1f}s after the drain" if self.settled_in_s is not None
               else "NOT within the wait"),
        ]


async def mirror_lines(nc: NATS, archive: OutArchive) -> list[str]:
    """The server-side mirror of LLM_OUT (observation only): its holes, and which of them
    the archive holds (messages LLM_OUT stored that the mirror skipped)."""
    try:
        resp = await nc.request(f"$JS.API.STREAM.INFO.{MIRROR}",
                                json.dumps({"deleted_details": True}).encode(), timeout=10.0)
        info = json.loads(resp.data)
        st = info["state"]
    except Exception as exc:
        return [f"mirror {MIRROR} (observation only): unreadable {exc!r}"]
    deleted = sorted(st.get("deleted") or [])
    held = [s for s in deleted if s in archive.msgs]
    return [f"mirror {MIRROR} of LLM_OUT (observation only, no figure reads it): "
            f"{st.get('messages', 0)} messages, seqs {st.get('first_seq', 0)}.."
            f"{st.get('last_seq', 0)}; holes (num_deleted) {st.get('num_deleted', 0)}, of "
            f"which the archive holds {len(held)} {_ranges(held)} (skipped by the mirror "
            f"though LLM_OUT stored them)"]
