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
_TTL_DISABLED = 10166  # JetStream: per-message TTL is disabled on the stream
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
    """Write a new run fence for `item`'s request; its sequence (0 when LLM_OUT does
    not capture run fences: a stream made by an older version, kept as it was)."""
    req = item.request
    subject = subjects.fence_store(req.group, req.request_id)
    try:
        # Kept past LLM_OUT's max_age: the run it fences may stream for longer.
        ack = await js.publish(subject, worker_id.encode(), timeout=timeout_s,
                               headers={"Nats-TTL": "never"})
    except APIError as exc:
        if exc.err_code != _TTL_DISABLED:
            raise
        log.warning("LLM_OUT does not allow per-message TTLs (made by an older version: "
                    "start with nats.update_streams to allow them): the run fence of %s "
                    "lasts its max_age", req.request_id)
        ack = await js.publish(subject, worker_id.encode(), timeout=timeout_s)
    except NoStreamResponseError:
        log.warning("LLM_OUT does not capture %s (made by an older version: start with "
                    "nats.update_streams to add it): %s runs on without a run fence",
                    subjects.fence_store_all, req.request_id)
        return 0
    return ack.seq


__all__ = ["Superseded", "store_fence", "write_run_fence"]
