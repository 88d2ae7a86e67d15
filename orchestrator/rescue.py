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
import time

import msgspec
import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from bus.outcome import StoredPublisher
from schemas.codec import encode, work_decoder
from schemas.messages import Role, WorkBatch
from schemas.settings import Settings
from schemas.subjects import consumer_for_work, model_target

log = logging.getLogger("cplane.orchestrator")


async def rescue_queue(js: JetStreamContext, store: StoredPublisher, settings: Settings,
                       role: Role, worker_id: str, models: list[str]) -> int:
    """Move every item queued for (or held by) a dead worker; returns how many moved."""
    stream = settings.streams.work.name
    durable = consumer_for_work(role, worker_id)
    try:
        psub = await js.pull_subscribe_bind(durable, stream=stream)
    except NotFoundError:
        return 0
    moved = 0
    # What the dead worker held comes back after its ack_wait: wait that long.
    deadline = time.monotonic() + settings.worker.ack_wait_s * 2 + 2
    try:
        while time.monotonic() < deadline:
            try:
                msgs = await psub.fetch(64, timeout=0.5)
            except (TimeoutError, nats.errors.TimeoutError):
                info = await js.consumer_info(stream, durable)
                if not info.num_pending and not info.num_ack_pending:
                    break
                continue
            for msg in msgs:
                moved += await _move(msg, store, settings, role, worker_id, models)
        with contextlib.suppress(Exception):
            await js.delete_consumer(stream, durable)
    finally:
        with contextlib.suppress(Exception):
            await psub.unsubscribe()
    if moved:
        log.info("moved %d work items of dead worker %s to their pools", moved, worker_id)
    return moved


async def _move(msg: Msg, store: StoredPublisher, settings: Settings, role: Role,
                worker_id: str, models: list[str]) -> int:
    try:
        batch = work_decoder.decode(msg.data)
    except msgspec.DecodeError:
        await msg.ack()  # nothing to move; workers dead-letter such bytes where they meet them
        return 0
    started = msg.metadata.num_delivered > 1  # the dead worker may have streamed part of it
    for item in batch.items:
        item = msgspec.structs.replace(item, redispatched=item.redispatched or started)
        model = item.request.model or (models[0] if models else "")
        subject = settings.subjects.work(item.role, model_target(model))
        rid = item.request.request_id
        msg_id = f"{rid}:{item.role.value}:{item.attempt}:{item.next_seq}:moved-{worker_id}"
        await store.publish(subject, encode(WorkBatch(items=[item])), msg_id)
    await msg.ack()
    return len(batch.items)
