"""Work sent to one worker that died: moved to a live worker of its model.

When a worker's heartbeats stop (it did not say goodbye), the leader drains
the worker's own consumer (`llm.work.<role>.<worker_id>`): messages still
queued, and the ones the dead worker held, which come back after their
ack_wait. Each item is republished to its model's pool with a deterministic
Nats-Msg-Id (the same a draining worker uses, so the two never double it),
flagged `redispatched` when it may have started, and the message is acked
only after that store. Then the consumer is deleted.
"""

from __future__ import annotations

import contextlib
import logging

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from bus.outcome import StoredPublisher
from bus.requeue import requeue
from schemas.messages import Role
from schemas.settings import Settings
from schemas.subjects import consumer_for_work

log = logging.getLogger("cplane.orchestrator")


async def rescue_queue(js: JetStreamContext, store: StoredPublisher, settings: Settings,
                       role: Role, worker_id: str, models: list[str]) -> int:
    """Move every item queued for (or held by) a dead worker; returns how many moved."""
    stream = settings.streams.work.name
    durable = consumer_for_work(role, worker_id)
    try:
        await js.consumer_info(stream, durable)
    except NotFoundError:
        return 0

    async def undecodable(msg: Msg, exc: Exception) -> None:
        log.warning("dropped undecodable work message %d of %s: %s",
                    msg.metadata.sequence.stream, worker_id, exc)

    # What the dead worker held comes back after its ack_wait: wait that long.
    moved = await requeue(
        js, store, settings, durable, worker_id,
        model_of=lambda item: item.request.model or (models[0] if models else ""),
        undecodable=undecodable, wait_held_s=settings.worker.ack_wait_s * 2 + 2)
    with contextlib.suppress(Exception):
        await js.delete_consumer(stream, durable)
    if moved:
        log.info("moved %d work items of dead worker %s to their pools", moved, worker_id)
    return moved
