"""Idempotent creation of the six streams, the durable consumers and the KV buckets.

Every component calls `ensure_all` (or its parts) at start-up and after a
reconnect, so any one of them can come up first and a stream that vanished
from the broker's store is re-created.

Promises:
- A missing stream, consumer or bucket is created from the settings.
- An existing stream is never silently weakened. When its configuration
  differs from the settings it is left as it is and a warning names every
  differing field, unless `settings.nats.update_streams` is set; even then a
  change that weakens it (fewer replicas, memory instead of file storage, a
  different retention, discard old instead of new, subjects removed) raises
  `StreamWeakeningError` naming the fields, and nothing is changed. So a
  worker started without the cluster config cannot turn R3 streams into R1.
- A durable consumer whose mutable fields (ack_wait, max_deliver,
  max_ack_pending, filter) differ from the settings is updated in place (the
  server keeps its position); a change the server refuses is logged and the
  consumer kept.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    RePublish,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamSource,
)
from nats.js.errors import APIError, BadRequestError, BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from cplane.schemas.messages import PRIORITIES, Priority, Role
from cplane.schemas.settings import Settings, StreamSettings
from cplane.schemas.subjects import (
    ANY_TARGET,
    MODEL_TARGET_PREFIX,
    Subjects,
    consumer_for_priority,
    consumer_for_work,
)

log = logging.getLogger("cplane.provision")
_STREAM_EXISTS = 10058  # "stream name already in use with a different configuration"

# Stream fields the settings decide; everything else on an existing stream is kept.
STREAM_FIELDS = (
    "subjects", "retention", "storage", "discard", "max_msgs", "max_bytes", "max_age",
    "max_msg_size", "duplicate_window", "num_replicas", "allow_direct",
)
# Consumer fields compared with the settings; the first four the server updates in place.
CONSUMER_FIELDS = ("ack_wait", "max_deliver", "max_ack_pending", "filter_subject", "ack_policy")


class StreamWeakeningError(RuntimeError):
    """The settings would weaken an existing stream; it was left unchanged."""

    def __init__(self, stream: str, fields: dict[str, tuple[object, object]]) -> None:
        detail = ", ".join(f"{k}: {cur!r} -> {new!r}" for k, (cur, new) in fields.items())
        super().__init__(
            f"refusing to weaken stream {stream} ({detail}); change it by hand if you mean it"
        )
        self.stream = stream
        self.fields = fields


# -- stream configurations (pure) -----------------------------------------------
def _stream_config(
    s: StreamSettings, subjects: list[str], retention: RetentionPolicy, discard_new: bool,
    republish: RePublish | None = None, sources: list[StreamSource] | None = None,
    allow_direct: bool = False,
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
        republish=republish,
        sources=sources,
        allow_direct=allow_direct,
    )


def stream_configs(settings: Settings) -> list[StreamConfig]:
    """The six streams: LLM_REQ, LLM_WORK, LLM_OUT, LLM_DONE, LLM_CANCEL, LLM_DLQ."""
    subj = settings.subjects
    st = settings.streams
    limits = RetentionPolicy.LIMITS
    return [
        # One subject pattern per priority: a publish to an unknown priority
        # matches no stream and the publisher gets an error.
        _stream_config(st.req, [subj.requests_of(p) for p in PRIORITIES],
                       RetentionPolicy.WORK_QUEUE, True),
        _stream_config(st.work, [subj.work_all], RetentionPolicy.WORK_QUEUE, True),
        # Outputs, chunks and terminals of a request in one stream, so readers get
        # them in the order the worker published them: stored first, then
        # republished (llm.s.out -> llm.out, llm.s.done -> llm.done).
        _stream_config(st.out, [subj.out_store_all, subj.done_store_all], limits, False,
                       RePublish(src=f"{subj.prefix}.s.*.>",
                                 dest=f"{subj.prefix}.{{{{wildcard(1)}}}}.>")),
        # Terminals kept for days: copied by the server from LLM_OUT. Direct gets:
        # the orchestrator asks for many ids' terminals in one request (bus/replay.py).
        _stream_config(st.done, [], limits, False, sources=[
            StreamSource(name=st.out.name, filter_subject=subj.done_store_all)],
            allow_direct=True),
        _stream_config(st.cancel, [subj.cancel_all], limits, False),
        _stream_config(st.dlq, [subj.dead_letters_all], limits, False),
    ]


def _norm(field: str, value: object) -> object:
    """One spelling per meaning: the server reports no age limit as 0, enums as strings."""
    if field == "subjects":
        return tuple(sorted(value or ()))  # type: ignore[call-overload]
    if field == "max_age":
        return float(value or 0)  # type: ignore[arg-type]
    if field in ("retention", "storage", "discard"):
        return getattr(value, "value", value)
    if field == "num_replicas":
        return value or 1
    if field == "allow_direct":
        return bool(value)
    return value


def stream_differences(
    current: StreamConfig, wanted: StreamConfig
) -> dict[str, tuple[object, object]]:
    """Field -> (current, wanted) for every settings-owned field that differs."""
    diffs: dict[str, tuple[object, object]] = {}
    for field in STREAM_FIELDS:
        cur = _norm(field, getattr(current, field))
        new = _norm(field, getattr(wanted, field))
        if cur != new:
            diffs[field] = (cur, new)
    return diffs


def weakening(current: StreamConfig, wanted: StreamConfig) -> dict[str, tuple[object, object]]:
    """The differences that would make `current` less safe if `wanted` were applied.

    Fewer replicas, memory instead of file, another retention, discard old
    instead of new (a full stream would drop accepted messages), or subjects
    removed (their publishers would be refused). Limits (age, size, count)
    are operator choices and not counted here.
    """
    diffs = stream_differences(current, wanted)
    weak: dict[str, tuple[object, object]] = {}
    for field, (cur, new) in diffs.items():
        if field == "num_replicas":
            is_weaker = int(new) < int(cur)  # type: ignore[call-overload]
        elif field == "storage":
            is_weaker = cur == StorageType.FILE.value and new == StorageType.MEMORY.value
        elif field == "retention":
            is_weaker = True
        elif field == "discard":
            is_weaker = cur == DiscardPolicy.NEW.value
        elif field == "subjects":
            is_weaker = not set(cur).issubset(set(new))  # type: ignore[call-overload]
        else:
            is_weaker = False
        if is_weaker:
            weak[field] = (cur, new)
    return weak


# -- streams (I/O) ----------------------------------------------------------------
_API_TRIES = 3  # a JetStream API request unanswered within its timeout is asked again


async def _current(js: JetStreamContext, name: str) -> StreamConfig:
    """The stream's config; NotFoundError if none. A busy server (many services
    provisioning at once on a loaded host) may answer after the request's
    timeout: reading is safe to repeat, so ask again before giving up."""
    for attempt in range(_API_TRIES):
        try:
            return (await js.stream_info(name)).config
        except TimeoutError:
            if attempt + 1 == _API_TRIES:
                raise
            log.info("stream_info %s unanswered; asking again", name)
    raise AssertionError("unreachable")


async def ensure_stream(js: JetStreamContext, cfg: StreamConfig, *, update: bool = False) -> None:
    """Create `cfg` if missing; else compare, warn, and update only if allowed and not weaker."""
    assert cfg.name is not None
    try:
        current = await _current(js, cfg.name)
    except NotFoundError:
        try:
            await js.add_stream(cfg)
            log.info("created stream %s", cfg.name)
            return
        except APIError as exc:
            # Created by another process meanwhile: "already exists", or, when
            # both creations overlap, the server may count the storage twice
            # and refuse ours with "insufficient storage" (seen with four
            # processes starting together). Either way: if it exists, use it.
            try:
                current = await _current(js, cfg.name)
            except NotFoundError:
                raise exc from None
            if not (isinstance(exc, BadRequestError) and exc.err_code == _STREAM_EXISTS):
                log.info("stream %s created by another process (%s)", cfg.name, exc)
    diffs = stream_differences(current, cfg)
    if not diffs:
        return
    detail = ", ".join(f"{k}: {cur!r} -> {new!r}" for k, (cur, new) in diffs.items())
    if not update:
        log.warning("stream %s differs from the settings and is kept as it is (%s); set "
                    "nats.update_streams to apply safe changes", cfg.name, detail)
        return
    weak = weakening(current, cfg)
    if weak:
        raise StreamWeakeningError(cfg.name, weak)
    if "subjects" in diffs:
        log.warning("stream %s: subjects change %s -> %s", cfg.name, *diffs["subjects"])
    merged = dataclasses.replace(current, **{f: getattr(cfg, f) for f in diffs})
    log.warning("updating stream %s (%s)", cfg.name, detail)
    await js.update_stream(merged)


async def ensure_streams(js: JetStreamContext, settings: Settings) -> None:
    """Ensure all six streams (see the module's promises)."""
    for cfg in stream_configs(settings):
        await ensure_stream(js, cfg, update=settings.nats.update_streams)


# -- consumers --------------------------------------------------------------------
def consumer_differences(
    current: ConsumerConfig, wanted: ConsumerConfig
) -> dict[str, tuple[object, object]]:
    diffs: dict[str, tuple[object, object]] = {}
    for field in CONSUMER_FIELDS:
        cur, new = getattr(current, field), getattr(wanted, field)
        cur, new = getattr(cur, "value", cur), getattr(new, "value", new)
        if new is not None and cur != new:
            diffs[field] = (cur, new)
    return diffs


async def ensure_consumer(js: JetStreamContext, stream: str, cfg: ConsumerConfig) -> None:
    """Create a durable consumer, or update one whose compared fields differ.

    The server keeps an updated consumer's position and pending acks. A
    change it refuses (an immutable field) is logged and the consumer kept.
    """
    assert cfg.durable_name is not None
    try:
        current = (await js.consumer_info(stream, cfg.durable_name)).config
    except NotFoundError:
        current = None
    if current is not None:
        diffs = consumer_differences(current, cfg)
        if not diffs:
            return
        log.info("updating consumer %s on %s: %s", cfg.durable_name, stream, diffs)
    try:
        await js.add_consumer(stream, cfg)
    except BadRequestError as exc:
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
        max_deliver=-1,  # the worker ends a work item after max_migrations itself
        max_ack_pending=100_000,
        max_waiting=512,
        # A dead worker's own consumer goes away after an hour idle; pools stay.
        inactive_threshold=None if target == ANY_TARGET or target.startswith(
            MODEL_TARGET_PREFIX) else 3600.0,
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


# -- lease bucket -----------------------------------------------------------------
async def ensure_lease_bucket(js: JetStreamContext, settings: Settings) -> KeyValue:
    """The KV bucket of the orchestrator lease: TTL `orchestrator.lease_ttl_s`, history 1.

    Idempotent. An existing bucket with another TTL is kept (with a warning),
    like a stream: entries would otherwise vanish under a live leader.
    """
    name = settings.subjects.leases_bucket
    ttl = settings.orchestrator.lease_ttl_s
    cfg = KeyValueConfig(bucket=name, ttl=ttl, history=1, storage=StorageType.FILE,
                         replicas=settings.streams.req.replicas)
    kv, created = await _create_or_open(js, cfg)
    if created:
        return kv
    status = await kv.status()
    if abs(float(status.ttl or 0) - ttl) > 1e-6:
        log.warning("lease bucket %s kept with ttl %s s (settings say %s s)", name,
                    status.ttl, ttl)
    return kv


# -- config bucket ----------------------------------------------------------------
CONFIG_HISTORY = 5  # past choices kept per key (`nats kv history`): who switched what, when


async def ensure_config_bucket(js: JetStreamContext, settings: Settings) -> KeyValue:
    """The KV bucket of fleet-wide runtime choices (the dispatch policy): no TTL, file storage.

    Idempotent. Its entries outlive every process and a broker restart, so a
    choice made at run time survives them. An existing bucket is kept as it is.
    """
    name = settings.subjects.config_bucket
    cfg = KeyValueConfig(bucket=name, history=CONFIG_HISTORY, storage=StorageType.FILE,
                         replicas=settings.streams.req.replicas)
    return (await _create_or_open(js, cfg))[0]


async def _create_or_open(js: JetStreamContext, cfg: KeyValueConfig) -> tuple[KeyValue, bool]:
    """(the bucket, whether we created it). One made by another process meanwhile
    is opened, whatever error its concurrent creation gave ours (see ensure_stream)."""
    try:
        return await js.create_key_value(cfg), True
    except APIError as exc:
        try:
            return await js.key_value(cfg.bucket), False
        except (NotFoundError, BucketNotFoundError):
            raise exc from None


# -- batch jobs -----------------------------------------------------------------------
async def ensure_batch_stores(js: JetStreamContext, settings: Settings
                              ) -> tuple[KeyValue, ObjectStore]:
    """The KV bucket of batch job records and the object store of their files.

    Both keep what they hold as long as LLM_DONE keeps terminals
    (`streams.done.max_age_s`, 7 days): a job outlives no result it points to.
    Idempotent; existing ones are kept as they are.
    """
    subj, done = settings.subjects, settings.streams.done
    ttl = done.max_age_s or None
    kv = (await _create_or_open(js, KeyValueConfig(
        bucket=subj.batch_jobs_bucket, history=1, ttl=ttl, storage=StorageType.FILE,
        replicas=done.replicas)))[0]
    try:
        obs = await js.object_store(subj.batch_files_bucket)
    except (NotFoundError, BucketNotFoundError):
        try:
            obs = await js.create_object_store(subj.batch_files_bucket, ObjectStoreConfig(
                ttl=ttl, storage=StorageType.FILE, replicas=done.replicas))
        except APIError:  # created by another process meanwhile
            obs = await js.object_store(subj.batch_files_bucket)
    return kv, obs


# -- everything ---------------------------------------------------------------------
async def ensure_all(js: JetStreamContext, settings: Settings) -> None:
    """Streams, request consumers and the lease bucket: start-up and after a reconnect.

    Call it again when a publish answers NoStreamResponseError (the broker
    lost a stream): it re-creates what is missing and leaves the rest alone.
    Work consumers belong to each worker (`ensure_work_consumer`).
    """
    await ensure_streams(js, settings)
    await ensure_request_consumers(js, settings)
    await ensure_lease_bucket(js, settings)


class Provisioner:
    """Single-flight `ensure_all` (plus a service's own `extra` step) for reconnect hooks.

    Concurrent callers (a reconnect and a burst of NoStreamResponseErrors)
    share one run; a call after a run has finished starts a new one.
    """

    def __init__(self, js: JetStreamContext, settings: Settings,
                 extra: Callable[[], Awaitable[None]] | None = None) -> None:
        self._js = js
        self._settings = settings
        self._extra = extra
        self._running: asyncio.Future[None] | None = None
        self.runs = 0  # completed runs, for tests and status

    async def ensure(self) -> None:
        if self._running is None or self._running.done():
            self._running = asyncio.ensure_future(self._run())
        await asyncio.shield(self._running)

    async def _run(self) -> None:
        await ensure_all(self._js, self._settings)
        if self._extra is not None:
            await self._extra()
        self.runs += 1


__all__ = [
    "CONSUMER_FIELDS",
    "STREAM_FIELDS",
    "Provisioner",
    "StreamWeakeningError",
    "delete_work_consumer",
    "ensure_all",
    "ensure_batch_stores",
    "ensure_config_bucket",
    "ensure_consumer",
    "ensure_lease_bucket",
    "ensure_request_consumers",
    "ensure_stream",
    "ensure_streams",
    "ensure_work_consumer",
    "request_consumer_config",
    "stream_configs",
    "stream_differences",
    "weakening",
    "work_consumer_config",
]
