"""What cplane's streams, consumers, KV buckets and object store should be (pure).

The configurations come from the settings alone; bus/provision.py creates them
and compares them with what a server holds, using the comparisons here
(`stream_differences`, `weakening`, `foreign_routing`, `consumer_differences`).

Replicas: every stream and store takes `streams.<name>.replicas`, or
`streams.replicas` when that is 0 (the default), so one setting makes the whole
set R3 on a cluster. Consumers are created with `num_replicas` 0: the server
gives them the stream's replica count and peers, and keeps them so when the
stream is raised (a consumer found with a count of its own is set back to 0).
"""

from __future__ import annotations

from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    RePublish,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamInfo,
    StreamSource,
)

from cplane.schemas.messages import PRIORITIES, Priority, Role
from cplane.schemas.settings import Settings, StoreSettings, StreamSettings
from cplane.schemas.subjects import (
    ANY_TARGET,
    DEFAULT_PARTITION,
    MODEL_TARGET_PREFIX,
    Subjects,
    consumer_for_priority,
    consumer_for_work,
)

# Stream fields the settings decide; everything else on an existing stream is kept.
STREAM_FIELDS = (
    "subjects", "retention", "storage", "discard", "max_msgs", "max_bytes", "max_age",
    "max_msg_size", "duplicate_window", "num_replicas", "allow_direct", "allow_msg_ttl",
    "allow_rollup_hdrs",
)
# How a stream routes messages beyond its subjects: set only as cplane configures it.
ROUTING_FIELDS = ("republish", "sources", "mirror", "subject_transform")
# Consumer fields compared with the settings; the first four the server updates in place.
# num_replicas: ours is 0 (the stream's count and peers); one set otherwise is put back.
CONSUMER_FIELDS = ("ack_wait", "max_deliver", "max_ack_pending", "filter_subject",
                   "filter_subjects", "ack_policy", "num_replicas")


class StreamWeakeningError(RuntimeError):
    """The settings would weaken an existing stream; it was left unchanged."""

    def __init__(self, stream: str, fields: dict[str, tuple[object, object]]) -> None:
        detail = ", ".join(f"{k}: {cur!r} -> {new!r}" for k, (cur, new) in fields.items())
        super().__init__(
            f"refusing to weaken stream {stream} ({detail}); change it by hand if you mean it"
        )
        self.stream = stream
        self.fields = fields



def replicas_of(settings: Settings, own: StreamSettings | StoreSettings) -> int:
    """A stream's or store's replica count: its own, else `streams.replicas`."""
    return own.replicas or settings.streams.replicas or 1


def _stream_config(
    s: StreamSettings, replicas: int, subjects: list[str], retention: RetentionPolicy,
    discard_new: bool,
    republish: RePublish | None = None, sources: list[StreamSource] | None = None,
    allow_direct: bool = False, allow_msg_ttl: bool | None = None,
    allow_rollup_hdrs: bool = False,
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
        num_replicas=replicas,
        discard=DiscardPolicy.NEW if discard_new else DiscardPolicy.OLD,
        republish=republish,
        sources=sources,
        allow_direct=allow_direct,
        allow_msg_ttl=allow_msg_ttl,
        allow_rollup_hdrs=allow_rollup_hdrs,
    )


def stream_configs(settings: Settings) -> list[StreamConfig]:
    """The six streams: LLM_REQ, LLM_WORK, LLM_OUT, LLM_DONE, LLM_CANCEL, LLM_DLQ."""
    subj, st, limits = settings.subjects, settings.streams, RetentionPolicy.LIMITS

    def rep(own: StreamSettings) -> int:
        return replicas_of(settings, own)

    return [
        # One subject pattern per priority: a publish to an unknown priority
        # matches no stream and the publisher gets an error.
        _stream_config(st.req, rep(st.req),
                       [s for p in PRIORITIES for s in request_filters(
                           subj, p, None if settings.orchestrator.partitions
                           else DEFAULT_PARTITION)],
                       RetentionPolicy.WORK_QUEUE, True),
        _stream_config(st.work, rep(st.work), [subj.work_all], RetentionPolicy.WORK_QUEUE, True),
        # Outputs, chunks and terminals of a request in one stream, so readers get them
        # in the order the worker published them: stored first, then republished
        # (llm.s.out -> llm.out, llm.s.done -> llm.done; run fences, llm.sf, are not
        # republished). Direct gets: a tenant's own.
        _stream_config(st.out, rep(st.out), [subj.out_store_all, subj.done_store_all,
                                            subj.fence_store_all], limits,
                       False, RePublish(src=f"{subj.prefix}.s.*.>",
                                        dest=f"{subj.prefix}.{{{{wildcard(1)}}}}.>"),
                       # run fences outlive max_age (`Nats-TTL: never`): a run may
                       # stream longer than LLM_OUT keeps its chunks; each replaces
                       # the request's fence before it (`Nats-Rollup: sub`)
                       allow_direct=True, allow_msg_ttl=True, allow_rollup_hdrs=True),
        # Terminals kept for days: copied by the server from LLM_OUT. Direct gets:
        # the orchestrator asks for many ids' terminals in one request (bus/replay.py).
        _stream_config(st.done, rep(st.done), [], limits, False, sources=[
            StreamSource(name=st.out.name, filter_subject=subj.done_store_all)],
            allow_direct=True),
        _stream_config(st.cancel, rep(st.cancel), [subj.cancel_all], limits, False),
        _stream_config(st.dlq, rep(st.dlq), [subj.dead_letters_all], limits, False),
    ]


def norm_field(field: str, value: object) -> object:
    """One spelling per meaning: the server reports no age limit as 0, enums as strings."""
    if field == "subjects":
        return tuple(sorted(value or ()))  # type: ignore[call-overload]
    if field == "max_age":
        return float(value or 0)  # type: ignore[arg-type]
    if field in ("retention", "storage", "discard"):
        return getattr(value, "value", value)
    if field == "num_replicas":
        return value or 1
    if field in ("allow_direct", "allow_msg_ttl", "allow_rollup_hdrs"):
        return bool(value)
    if field == "republish" and value is not None:
        return (value.src, value.dest, bool(value.headers_only))  # type: ignore[attr-defined]
    if field == "sources":
        return tuple(sorted(map(repr, map(_source, value or ()))))  # type: ignore[call-overload]
    if field == "mirror":
        return _source(value)  # type: ignore[arg-type]
    if field == "subject_transform" and value is not None:
        return (value.src, value.dest)  # type: ignore[attr-defined]
    return value


def _source(s: StreamSource | None) -> object:
    if s is None:
        return None
    ext = s.external.api if s.external is not None else ""
    return (s.name, s.filter_subject or "", ext,
            tuple((t.src, t.dest) for t in s.subject_transforms or ()))


def stream_differences(
    current: StreamConfig, wanted: StreamConfig, fields: tuple[str, ...] = STREAM_FIELDS
) -> dict[str, tuple[object, object]]:
    """Field -> (current, wanted) for every settings-owned field (of `fields`) that differs."""
    diffs: dict[str, tuple[object, object]] = {}
    for field in fields:
        cur = norm_field(field, getattr(current, field))
        new = norm_field(field, getattr(wanted, field))
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


class ForeignStreamError(RuntimeError):
    """An existing stream routes messages as cplane never configures it (see
    foreign_routing; a store's subjects too): nothing is changed, the caller stops."""

    def __init__(self, stream: str, fields: dict[str, tuple[object, object]]) -> None:
        detail = ", ".join(f"{k}: {cur!r}, ours {new!r}" for k, (cur, new) in fields.items())
        super().__init__(
            f"refusing to start: stream {stream} routes messages as cplane did not configure "
            f"({detail}); delete it (nats stream rm {stream}) and start the orchestrator again")
        self.stream = stream
        self.fields = fields


def foreign_routing(current: StreamConfig, wanted: StreamConfig
                    ) -> dict[str, tuple[object, object]]:
    """Routing of `current` that `wanted` (ours) does not configure: a RePublish, sources,
    a mirror or a subject transform could send stored messages to any subject
    (`llm.admin.*`) or pull in other streams. LLM_OUT's RePublish and LLM_DONE's
    source are ours, so they pass."""
    return stream_differences(current, wanted, ROUTING_FIELDS)


def consumer_differences(
    current: ConsumerConfig, wanted: ConsumerConfig
) -> dict[str, tuple[object, object]]:
    diffs: dict[str, tuple[object, object]] = {}
    for field in CONSUMER_FIELDS:
        cur, new = getattr(current, field), getattr(wanted, field)
        cur, new = getattr(cur, "value", cur), getattr(new, "value", new)
        if field == "num_replicas":
            cur = cur or 0  # the server leaves out 0 (the stream's count)
        if new is not None and cur != new:
            diffs[field] = (cur, new)
    return diffs


def request_filters(subjects: Subjects, p: Priority, pool: str | None) -> list[str]:
    """The request subjects of priority `p` that one consumer reads: one partition's
    pool token (`DEFAULT_PARTITION`: the forms without one, all an unpartitioned fleet
    has), or every form (None: the stream's subjects when partitions are configured)."""
    plain = [subjects.requests_of(p), subjects.tenant_requests_of(p)]
    if pool == DEFAULT_PARTITION:
        return plain
    star = "*" if pool is None else pool
    return [*(plain if pool is None else []), subjects.pool_requests_of(star, p),
            subjects.tenant_pool_requests_of(star, p)]


def request_consumer_config(settings: Settings, subjects: Subjects, p: Priority,
                            pool: str = DEFAULT_PARTITION) -> ConsumerConfig:
    """Priority `p`'s consumer of one partition (its pool token; see `request_filters`)."""
    o = settings.orchestrator
    return ConsumerConfig(
        durable_name=consumer_for_priority(p, pool),
        num_replicas=0,  # the stream's replicas and peers (see the module's docstring)
        filter_subjects=request_filters(subjects, p, pool),
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=o.ack_wait_s,
        max_deliver=-1,  # the orchestrator dead-letters at o.max_deliveries itself
        max_ack_pending=max(o.hold_per_priority * 4, 1024),
        max_waiting=512,
    )


def work_consumer_config(settings: Settings, role: Role, target: str) -> ConsumerConfig:
    w = settings.worker
    return ConsumerConfig(
        durable_name=consumer_for_work(role, target),
        num_replicas=0,
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


CONFIG_HISTORY = 5  # past choices kept per key (`nats kv history`): who switched what, when
# Set to the settings on an existing store (its data kept): the bounds on what it may hold.
STORE_LIMITS = ("max_bytes", "max_msg_size", "max_msgs", "max_msgs_per_subject", "discard")


def claims_bucket(settings: Settings) -> str:
    """KV bucket of the workers' per-request claims (bus/claims.py)."""
    return f"{settings.subjects.prefix}_claims"


def _kv_config(bucket: str, lim: StoreSettings, *, replicas: int, history: int = 1,
               ttl_s: float | None = None) -> StreamConfig:
    """A bucket's stream as nats-py's create_key_value makes it, with our limits."""
    return StreamConfig(
        name=f"KV_{bucket}", subjects=[f"$KV.{bucket}.>"], retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE, num_replicas=replicas, discard=DiscardPolicy.NEW,
        max_bytes=lim.max_bytes, max_msg_size=lim.max_value_size, max_msgs=-1,
        max_msgs_per_subject=history, max_age=ttl_s, max_consumers=-1,
        duplicate_window=min(120.0, ttl_s or 120.0),
        allow_rollup_hdrs=True, allow_msg_ttl=True, deny_delete=True)


def _object_config(bucket: str, lim: StoreSettings, *, replicas: int,
                   ttl_s: float | None = None) -> StreamConfig:
    """An object store's stream as nats-py's create_object_store makes it, with our limits."""
    return StreamConfig(
        name=f"OBJ_{bucket}", subjects=[f"$O.{bucket}.C.>", f"$O.{bucket}.M.>"],
        retention=RetentionPolicy.LIMITS, storage=StorageType.FILE, num_replicas=replicas,
        discard=DiscardPolicy.NEW, max_bytes=lim.max_bytes, max_msg_size=lim.max_value_size,
        max_msgs=-1, max_age=ttl_s, max_consumers=-1, duplicate_window=120.0,
        allow_rollup_hdrs=True, allow_direct=True)


def store_configs(settings: Settings) -> dict[str, StreamConfig]:
    """The five stores' streams, keyed as their limits in `streams`. Batch jobs and
    files live as long as LLM_DONE keeps terminals (a job outlives no result it
    points to); config keeps 5 past values; leases and claims expire by TTL."""
    subj, st = settings.subjects, settings.streams
    done_ttl = st.done.max_age_s or None

    def rep(own: StoreSettings) -> int:
        return replicas_of(settings, own)

    return {
        "leases": _kv_config(subj.leases_bucket, st.leases, replicas=rep(st.leases),
                             ttl_s=settings.orchestrator.lease_ttl_s),
        "claims": _kv_config(claims_bucket(settings), st.claims, replicas=rep(st.claims),
                             ttl_s=settings.worker.claim_ttl_s),
        "config": _kv_config(subj.config_bucket, st.config, replicas=rep(st.config),
                             history=CONFIG_HISTORY),
        "batch_jobs": _kv_config(subj.batch_jobs_bucket, st.batch_jobs,
                                 replicas=rep(st.batch_jobs), ttl_s=done_ttl),
        "batch_files": _object_config(subj.batch_files_bucket, st.batch_files,
                                      replicas=rep(st.batch_files), ttl_s=done_ttl),
    }


def copy_behind(info: StreamInfo) -> tuple[int, float] | None:
    """How far a stream's copies of others (its sources and mirror, as the server reports
    them) are behind, at worst: (messages, seconds since contact); None when it copies
    nothing. LLM_DONE copies LLM_OUT's terminals so: what ages out of LLM_OUT before it
    is copied never reaches LLM_DONE."""
    copies = [*(info.sources or []), *([info.mirror] if info.mirror else [])]
    if not copies:
        return None
    return (max(c.lag or 0 for c in copies),
            max(max(c.active or 0, 0) for c in copies) / 1e9)


__all__ = [
    "CONFIG_HISTORY",
    "CONSUMER_FIELDS",
    "ROUTING_FIELDS",
    "STORE_LIMITS",
    "STREAM_FIELDS",
    "ForeignStreamError",
    "StreamWeakeningError",
    "claims_bucket",
    "consumer_differences",
    "copy_behind",
    "foreign_routing",
    "norm_field",
    "replicas_of",
    "request_consumer_config",
    "request_filters",
    "store_configs",
    "stream_configs",
    "stream_differences",
    "weakening",
    "work_consumer_config",
]
