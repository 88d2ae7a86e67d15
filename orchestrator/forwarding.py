"""Forwarding a request to its model's partition (partitioned leadership,
docs/replicas.md): the I/O of `Intake.FORWARD`."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable
from typing import Any

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from cplane.orchestrator.intake import sniff_model
from cplane.orchestrator.partitions import PartitionMap
from cplane.schemas import trace
from cplane.schemas.subjects import DEFAULT_PARTITION, Subjects

log = logging.getLogger("cplane.orchestrator")
_RETRY_S = 0.5
# LLM_REQ full this long: the request is refused (ErrorReply overloaded) rather than
# forwarded. A full stream of requests all waiting to be forwarded would otherwise
# wait for each other for good: each forward needs a free place first.
FULL_PATIENCE_S = 2.0
_FULL = ("10077", "maximum messages", "maximum bytes", "resources exceeded")


class Forwarded(enum.Enum):
    STORED = "stored"  # on its partition's subject, and acked here
    GIVEN_BACK = "given_back"  # naked: this replica no longer leads the partition
    FULL = "full"  # LLM_REQ stayed full: the caller refuses it (overloaded), then acks


async def forward(js: JetStreamContext, subjects: Subjects, partitions: PartitionMap,
                  msg: Msg, seq: int, *, leads: Callable[[str], bool], timeout_s: float
                  ) -> Forwarded:
    """Republish `msg` (LLM_REQ sequence `seq`), unchanged, on the subject of its model's
    partition (tenant and trace header kept), then ack it: only that partition's
    leader dispatches on its pool's workers. The Nats-Msg-Id is `fwd:<seq>`: a
    replica that forwards it again after a crash stores no second copy. A refused
    publish (LLM_REQ full, the broker away) is tried again here, the message kept
    alive, while this replica `leads` the partition it came from (a nak would count
    a delivery and could dead-letter it); else it is naked to that partition's next
    leader. LLM_REQ full for `FULL_PATIENCE_S`: FULL, the message left unacked."""
    subject = subjects.parse_request_subject(msg.subject)
    target = subjects.request(subject.priority, subject.slo_class, subject.tenant,
                              partitions.of_model(sniff_model(msg.data) or ""))
    headers = {"Nats-Msg-Id": f"fwd:{seq}"}
    if msg.headers and (tp := msg.headers.get(trace.HEADER)):
        headers[trace.HEADER] = tp
    pause = _RETRY_S
    full_since: float | None = None
    while True:
        try:
            await js.publish(target, msg.data, headers=headers, timeout=timeout_s)
            break
        except Exception as exc:
            if not leads(subject.pool):
                with contextlib.suppress(Exception):
                    await msg.nak()
                return Forwarded.GIVEN_BACK
            if any(f in str(exc) for f in _FULL):
                full_since = full_since or time.monotonic()
                if time.monotonic() - full_since >= FULL_PATIENCE_S:
                    return Forwarded.FULL
            else:
                full_since = None
            log.info("forwarding request seq %d to %s: %s; again in %.1f s", seq, target,
                     exc, pause)
            with contextlib.suppress(Exception):
                await msg.in_progress()
            await asyncio.sleep(pause)  # back-off before the next try
            pause = min(2 * pause, 2.0)
    with contextlib.suppress(Exception):
        await msg.ack()
    return Forwarded.STORED


class Forwarder:
    """The intake's side of forwarding: which partition a delivery is for, and the
    forwards under way (they hold LLM_REQ messages: the pullers count them)."""

    def __init__(self, subjects: Subjects, partitions: PartitionMap,
                 leads: Callable[[str], bool], timeout_s: float, stats: Any) -> None:
        self.subjects, self.partitions, self.leads = subjects, partitions, leads
        self.timeout_s = timeout_s
        self.stats = stats  # OrchestratorStats: `forwarded` counts
        self.busy = 0

    def partition_of(self, msg: Msg) -> tuple[str, bool]:
        """The partition whose subject a delivery came on, and whether the model its
        body names is another partition's (then it is forwarded, not admitted)."""
        if not self.partitions.enabled:
            return DEFAULT_PARTITION, False
        pool = self.subjects.parse_request_subject(msg.subject).pool
        model = sniff_model(msg.data)
        return pool, model is not None and self.partitions.of_model(model) != pool

    async def forward(self, js: JetStreamContext, msg: Msg, seq: int) -> Forwarded:
        self.busy += 1
        try:
            done = await forward(js, self.subjects, self.partitions, msg, seq,
                                 leads=self.leads, timeout_s=self.timeout_s)
        finally:
            self.busy -= 1
        if done is Forwarded.STORED:
            self.stats.forwarded += 1
        return done


__all__ = ["FULL_PATIENCE_S", "Forwarded", "Forwarder", "forward"]
