"""Idempotent creation of the four streams and the durable consumers.

Every component calls `ensure_streams` at start-up, so any one of them can
come up first. An existing stream whose configuration differs is updated in
place (limits, age); a change the server refuses is reported, not hidden.
"""

from __future__ import annotations

import logging

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError

from schemas.messages import PRIORITIES, Priority, Role
from schemas.settings import Settings, StreamSettings
from schemas.subjects import Subjects, consumer_for_priority, consumer_for_work

log = logging.getLogger("cplane.provision")


def _stream_config(
    s: StreamSettings, subjects: list[str], retention: RetentionPolicy, discard_new: bool
) -> StreamConfig:
    return StreamConfig(
        name=s.name,
        subjects=subjects,
        retention=retention,
        storage=StorageType.MEMORY if s.storage == "memory" else StorageType.FILE,
        max_bytes=s.max_bytes,
        max_msgs=s.max_msgs,
        max_age=s.max_age_s or None,
        max_msg_size=s.max_msg_size,
        duplicate_window=s.duplicate_window_s,
        num_replicas=s.replicas,
        discard=DiscardPolicy.NEW if discard_new else DiscardPolicy.OLD,
    )


def stream_configs(settings: Settings) -> list[StreamConfig]:
    subj = settings.subjects
    st = settings.streams
    return [
        _stream_config(
            # One subject pattern per priority: a publish to an unknown
            # priority matches no stream and the publisher gets an error.
            st.req, [subj.requests_of(p) for p in PRIORITIES], RetentionPolicy.WORK_QUEUE, True
        ),
        _stream_config(st.work, [subj.work_all], RetentionPolicy.WORK_QUEUE, True),
        _stream_config(st.out, [subj.out_all], RetentionPolicy.LIMITS, False),
        _stream_config(st.done, [subj.done_all], RetentionPolicy.LIMITS, False),
    ]


async def ensure_stream(js: JetStreamContext, cfg: StreamConfig) -> None:
    try:
        await js.add_stream(cfg)
    except BadRequestError as exc:
        # 10058: exists with a different configuration -> update it in place.
        if exc.err_code != 10058:
            raise
        log.info("updating stream %s to the configured limits", cfg.name)
        await js.update_stream(cfg)


async def ensure_streams(js: JetStreamContext, settings: Settings) -> None:
    for cfg in stream_configs(settings):
        await ensure_stream(js, cfg)


async def ensure_consumer(js: JetStreamContext, stream: str, cfg: ConsumerConfig) -> None:
    """Create or update a durable consumer (the server keeps its position)."""
    try:
        await js.add_consumer(stream, cfg)
    except BadRequestError as exc:
        # An existing consumer with an immutable field changed: keep it, say so.
        log.warning("consumer %s on %s kept as is: %s", cfg.durable_name, stream, exc)


def request_consumer_config(settings: Settings, subjects: Subjects, p: Priority) -> ConsumerConfig:
    o = settings.orchestrator
    return ConsumerConfig(
        durable_name=consumer_for_priority(p),
        filter_subject=subjects.requests_of(p),
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=o.ack_wait_s,
        max_deliver=-1,  # the orchestrator dead-letters at o.max_deliveries itself
        max_ack_pending=max(o.hold_per_priority * 4, 1024),
        max_waiting=512,
    )


async def ensure_request_consumers(js: JetStreamContext, settings: Settings) -> None:
    for p in PRIORITIES:
        cfg = request_consumer_config(settings, settings.subjects, p)
        await ensure_consumer(js, settings.streams.req.name, cfg)


def work_consumer_config(settings: Settings, role: Role, target: str) -> ConsumerConfig:
    w = settings.worker
    return ConsumerConfig(
        durable_name=consumer_for_work(role, target),
        filter_subject=settings.subjects.work(role, target),
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=w.ack_wait_s,
        max_deliver=-1,  # a work item is retried until some worker finishes it
        max_ack_pending=100_000,
        max_waiting=512,
        # A dead worker's own consumer goes away after an hour idle.
        inactive_threshold=3600.0 if target != "any" else None,
    )


async def ensure_work_consumer(
    js: JetStreamContext, settings: Settings, role: Role, target: str
) -> str:
    cfg = work_consumer_config(settings, role, target)
    await ensure_consumer(js, settings.streams.work.name, cfg)
    assert cfg.durable_name is not None
    return cfg.durable_name


async def delete_work_consumer(
    js: JetStreamContext, settings: Settings, role: Role, target: str
) -> None:
    try:
        await js.delete_consumer(settings.streams.work.name, consumer_for_work(role, target))
    except NotFoundError:
        pass
