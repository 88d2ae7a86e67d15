"""Run fences in the store: LLM_OUT refuses outputs of a run that was taken over.

The clock fence (fence.py) stops a worker from publishing once it may have
been taken over; it cannot stop bytes already on their way. A worker cut off
by a partition, then killed, leaves its last writes in a socket buffer, and
the network delivers them when the partition heals, seconds later, after a
successor began the request again: without a fence in the store they would
be stored beside the successor's chunks, and the dead run's Final (its own
text) would close the stream.

So a run that takes a request over (a redelivered, redispatched or stale
item: one that checks what an earlier run stored) first writes a run fence on
`llm.sf.<group>.<id>.run.fence`, captured by LLM_OUT, and continues after the chunks
stored before it. Every chunk and terminal a run publishes carries
`Nats-Expected-Last-Subject-Sequence: <its fence's sequence>` for that subject
(0 for a first run, which wrote none): the server stores it only while that
fence is still the request's newest, so anything a superseded run still
sends is refused, however late it arrives. The fence sequence travels with
the item (`WorkItem.fence_seq`) to the decode worker of a hand-off.

Only a request's newest fence refuses anything, so each fence replaces the one
before it (`Nats-Rollup: sub`), and once the run's terminal is stored it closes
its fence (`close_run_fence`): a closing fence that LLM_OUT's max_age takes away
replaces the one kept forever. So the store holds one fence per request taken
over, for max_age after the request ends, not one per takeover for ever.

On a single broker only (`ServeContext.run_fences`). A replicated LLM_OUT
refuses a publish naming a subject's last sequence while an earlier publish
naming it is still being replicated, so a stream's chunks, a few hundred
microseconds apart, would be dropped; there the clock fence and the per-seq
Nats-Msg-Ids are what holds (docs/guarantees.md, "What is not covered").
"""

from __future__ import annotations

import logging

from nats.js import JetStreamContext
from nats.js.errors import APIError, NoStreamResponseError

from cplane.schemas.messages import WorkItem
from cplane.schemas.subjects import Subjects

log = logging.getLogger("cplane.worker")
# JetStream's refusals of a header the stream does not allow: the header it names
_OLDER_STREAM = {10166: "Nats-TTL", 10111: "Nats-Rollup"}
ROLLUP = "Nats-Rollup"
EXPECTED_SEQ = "Nats-Expected-Last-Subject-Sequence"
EXPECTED_SUBJECT = "Nats-Expected-Last-Subject-Sequence-Subject"


class Superseded(Exception):
    """The store refused this run's terminal: another run took the request over."""


def store_fence(subjects: Subjects, item: WorkItem) -> dict[str, str]:
    """The headers that make LLM_OUT store an output of `item`'s run only while its
    fence is the request's newest."""
    req = item.request
    return {EXPECTED_SEQ: str(item.fence_seq),
            EXPECTED_SUBJECT: subjects.fence_store(req.group, req.request_id)}


async def write_run_fence(js: JetStreamContext, subjects: Subjects, item: WorkItem,
                          worker_id: str, timeout_s: float) -> int:
    """Write a new run fence for `item`'s request, in place of the one before it; its
    sequence (0 when LLM_OUT does not capture run fences: a stream made by an older
    version, kept as it was)."""
    req = item.request
    subject = subjects.fence_store(req.group, req.request_id)
    # Kept past LLM_OUT's max_age: the run it fences may stream for longer. Only the
    # newest fence refuses anything (the expected sequence is the subject's last), so
    # it replaces the earlier ones: one fence per request, not one per takeover.
    headers = {"Nats-TTL": "never", ROLLUP: "sub"}
    while True:
        try:
            ack = await js.publish(subject, worker_id.encode(), timeout=timeout_s,
                                   headers=headers)
            return ack.seq
        except APIError as exc:
            dropped = _OLDER_STREAM.get(exc.err_code or 0)
            if dropped is None or dropped not in headers:
                raise
            log.warning("LLM_OUT does not allow %s headers (made by an older version: start "
                        "with nats.update_streams to allow them): the run fence of %s goes "
                        "without", dropped, req.request_id)
            del headers[dropped]
        except NoStreamResponseError:
            log.warning("LLM_OUT does not capture %s (made by an older version: start with "
                        "nats.update_streams to add it): %s runs on without a run fence",
                        subjects.fence_store_all, req.request_id)
            return 0


async def close_run_fence(js: JetStreamContext, subjects: Subjects, item: WorkItem,
                          worker_id: str, timeout_s: float) -> bool:
    """After `item`'s run stored its terminal: replace its fence, kept forever, by a
    closing one that LLM_OUT's max_age takes, as it takes the request's chunks; only
    while the run's own fence is the newest. Until max_age has passed, late bytes of
    any earlier run stay refused. A first run (no fence) does nothing. True when
    closed; a failure (a newer run's fence, the broker away) leaves the fence as it
    was: one message per request, kept."""
    if not item.fence_seq:
        return False
    req = item.request
    try:
        await js.publish(subjects.fence_store(req.group, req.request_id),
                         f"{worker_id} closed".encode(), timeout=timeout_s,
                         headers={**store_fence(subjects, item), ROLLUP: "sub"})
        return True
    except Exception as exc:
        log.info("run fence #%d of %s left as it is: %r", item.fence_seq, req.request_id, exc)
        return False


__all__ = ["Superseded", "close_run_fence", "store_fence", "write_run_fence"]
