"""One settings struct per service, loaded in one place.

Order: built-in defaults, then a TOML file (`--config` or `CPLANE_CONFIG`),
then environment variables `CPLANE__<SECTION>__<KEY>` (e.g.
`CPLANE__ORCHESTRATOR__MAX_BATCH=32`). No file is needed.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from cplane.schemas.subjects import Subjects

ENV_PREFIX = "CPLANE__"
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


class StreamSettings(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    storage: str = "file"  # file | memory
    max_bytes: int = -1  # -1 = unlimited
    max_msgs: int = -1
    max_age_s: float = 0.0  # 0 = forever
    max_msg_size: int = -1
    duplicate_window_s: float = 120.0
    replicas: int = 0  # copies on a JetStream cluster; 0: `streams.replicas`


class StoreSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Limits of a KV bucket or object store. The orchestrator provisions every one
    (bus/provision.py ensure_all) and sets these on one that exists with others."""

    max_bytes: int  # the whole store; the server reserves it up front
    max_value_size: int = -1  # one stored message (a value, an object chunk); -1 = max_payload
    replicas: int = 0  # copies on a JetStream cluster; 0: `streams.replicas`


class StreamsSettings(msgspec.Struct, frozen=True, kw_only=True):
    # Copies of every stream, KV bucket and object store (each may set its own):
    # 3 on a 3-node cluster (`cplane up --cluster 3` sets it), so an ack means a
    # majority of nodes stored the message (README, "Guarantees"); at most the
    # number of nodes.
    replicas: int = 1
    # Requests: discard=new with size limits, so an overloaded system
    # refuses at publish time instead of queueing forever.
    req: StreamSettings = StreamSettings(
        name="LLM_REQ", max_bytes=1 << 30, max_msgs=1_000_000
    )
    work: StreamSettings = StreamSettings(name="LLM_WORK", max_bytes=1 << 30)
    # Token chunks: file storage so they survive a broker restart (a client
    # replays, a worker taking over continues after them); short-lived.
    out: StreamSettings = StreamSettings(name="LLM_OUT", max_age_s=300.0, max_bytes=1 << 30)
    done: StreamSettings = StreamSettings(
        name="LLM_DONE", max_age_s=7 * 86400.0, max_bytes=8 << 30
    )
    # Cancels are stored so a worker or orchestrator started after one honours it.
    cancel: StreamSettings = StreamSettings(
        name="LLM_CANCEL", max_age_s=3600.0, max_msgs=1_000_000, max_bytes=256 << 20
    )
    # Dead letters: evidence of messages taken out of LLM_REQ / LLM_WORK.
    dlq: StreamSettings = StreamSettings(
        name="LLM_DLQ", max_age_s=7 * 86400.0, max_bytes=1 << 30
    )
    # KV buckets and object stores (names from the subject prefix: `<prefix>_leases`...).
    # Bounded, so no client can fill the disk that LLM_REQ needs.
    leases: StoreSettings = StoreSettings(max_bytes=64 << 20, max_value_size=4 << 10)
    claims: StoreSettings = StoreSettings(max_bytes=64 << 20, max_value_size=4 << 10)
    config: StoreSettings = StoreSettings(max_bytes=64 << 20, max_value_size=64 << 10)
    batch_jobs: StoreSettings = StoreSettings(max_bytes=256 << 20, max_value_size=64 << 10)
    # Batch inputs and result parts: object chunks are 128 KiB (nats-py's default).
    # JetStream reserves every max_bytes up front against the server's store: all
    # the defaults together stay near 12.5 GiB (raise this one for big batch jobs).
    batch_files: StoreSettings = StoreSettings(max_bytes=1 << 30, max_value_size=1 << 20)


class NatsSettings(msgspec.Struct, frozen=True, kw_only=True):
    url: str = DEFAULT_NATS_URL
    prefix: str = "llm"
    # An existing stream whose configuration differs is left as it is (with a
    # warning) unless this is set; even then a change that weakens it (fewer
    # replicas, memory instead of file) is refused.
    update_streams: bool = False
    # Credentials and TLS (bus/credentials.py): a credentials file (a NATS .creds
    # file, an nkey seed, or JSON {"user", "password"}), so no password needs to be
    # in the URL; without it NATS_CREDS, then NATS_USER + NATS_PASSWORD, are read.
    creds: str | None = None
    tls_ca: str | None = None  # CA file verifying the server; TLS is on when set
    tls_cert: str | None = None  # client certificate (when the server verifies clients)
    tls_key: str | None = None  # its private key


class LimitsSettings(msgspec.Struct, frozen=True, kw_only=True):
    """What a request may ask for; checked at intake (orchestrator) and by workers."""

    max_tokens: int = 32_768  # upper bound on Request.max_tokens
    max_prompt_chars: int = 2_000_000  # text prompt / chat content, in characters
    max_prompt_token_ids: int = 262_144  # prompt_token_ids length
    max_stop: int = 16  # stop strings
    # reply_to must start with one of these (never the system's own subjects).
    reply_to_prefixes: tuple[str, ...] = ("_INBOX.",)
    max_dead_letter_bytes: int = 65_536  # body kept as evidence in a DeadLetter


class SloClass(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a class of requests is promised, and what happens when it cannot be."""

    ttft_ms: float  # time to first token target
    tpot_ms: float  # time per output token target
    deadline_ms: float = 0.0  # default end-to-end budget from publish (0 = none)
    # When its target can no longer be met: shed at once (ErrorReply overloaded,
    # retryable, with retry_after_ms) or run late.
    sheddable: bool = False
    weight: float = 1.0  # share of the fleet under contention, relative to other classes


DEFAULT_SLO_CLASSES: dict[str, SloClass] = {
    "interactive": SloClass(ttft_ms=250.0, tpot_ms=100.0, sheddable=True, weight=4.0),
    "standard": SloClass(ttft_ms=1000.0, tpot_ms=100.0, weight=2.0),
    "batch": SloClass(ttft_ms=30_000.0, tpot_ms=500.0, weight=1.0),
}


class TenantPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What one tenant may ask for (the tenant from its credentials: docs/security.md).
    Above a ceiling a request gets an ErrorReply (`forbidden` / `rate_limited`),
    never a silent downgrade."""

    max_priority: str | None = None  # the highest priority name it may use (None: any)
    max_rps: float | None = None  # new requests per second (token bucket; burst = 1 s)
    max_in_flight: int | None = None  # requests held or running at once


class OrchestratorSettings(msgspec.Struct, frozen=True, kw_only=True):
    orchestrator_id: str = ""  # "" = generated at start
    # Decision plugins by name (orchestrator/plugins.py); their parameters as a
    # table each, checked at start (an unknown key fails and names itself).
    policy: str = "priority"  # fifo | priority
    policy_params: dict[str, Any] = msgspec.field(default_factory=dict)
    aging_s: float = 10.0  # priority: waiting this long raises a request one level
    router: str = "pool"  # pool | round_robin | random | least_loaded
    router_params: dict[str, Any] = msgspec.field(default_factory=dict)
    route_seed: int = 0  # seeds random routers (0 = from the OS)
    # SLO classes by name (the subject's `<slo_class>` token); a name not listed
    # is served as `default_slo_class` (and counted: see the stats).
    slo_classes: dict[str, SloClass] = msgspec.field(
        default_factory=lambda: dict(DEFAULT_SLO_CLASSES))
    default_slo_class: str = "standard"
    # Tenant fairness (policies with fair = true): weight per tenant (default 1).
    tenant_weights: dict[str, float] = msgspec.field(default_factory=dict)
    # Ceilings of tenants' requests (those on `llm.req.<tenant>.<priority>.<slo>`):
    # per tenant, else `tenant_policy`. The system's own principals have none.
    tenants: dict[str, TenantPolicy] = msgspec.field(default_factory=dict)
    tenant_policy: TenantPolicy = TenantPolicy()
    # Prompt tokens one worker prefills per second, until heartbeats show faster
    # (slo_aware's and admission's TTFT estimates).
    prefill_tokens_per_s: float = 50_000.0
    # prefix_aware: prompts are hashed in blocks of this many tokens at intake
    # (the engines' cache block size, for workers' KV events to match).
    prefix_block_tokens: int = 512
    # How prompts are tokenized for those hashes: "" = about 4 characters a
    # token (approximate: matches only what this orchestrator sent), "words" =
    # the sim engine's tokenizer, or the path of a Hugging Face tokenizer
    # (directory or tokenizer.json) = the model's own, so blocks the engines
    # report in their KV events (precise prefix routing) are found.
    prefix_tokenizer: str = ""
    max_batch: int = 16  # work items per LLM_WORK message at most
    hold_per_priority: int = 512  # request messages held unacked per priority at most
    fetch_batch: int = 128
    fetch_timeout_s: float = 2.0
    # Held request messages get in_progress() every `in_progress_every_s`; a
    # crashed orchestrator's messages come back after `ack_wait_s`.
    ack_wait_s: float = 10.0
    in_progress_every_s: float = 3.0
    # A request delivered this many times without an outcome is dead-lettered
    # (ErrorReply dead_letter). Enforced here, not by the consumer's max_deliver,
    # which would leave the message in the stream for good.
    max_deliveries: int = 8
    # One active orchestrator at a time: it holds a KV lease renewed every
    # `lease_renew_s`; a standby takes over `lease_ttl_s` after the last renewal.
    lease_ttl_s: float = 3.0
    lease_renew_s: float = 1.0
    # Partitioned leadership (docs/replicas.md): the models whose pools each get a
    # lease of their own (`orchestrator.<pool>`) and their own request subjects, so
    # replicas dispatch for different pools at once; everything else is the default
    # partition (lease `orchestrator`). Empty: one leader for the whole fleet. Every
    # replica, gateway and client must name the same list. Env: comma-separated.
    partitions: tuple[str, ...] = ()
    # A request for a model no live worker serves waits this long (or until its
    # deadline), then gets ErrorReply model_unavailable (retryable).
    model_wait_s: float = 30.0
    # Dispatched requests with no terminal seen for this long are looked up in
    # LLM_DONE (a Final missed during a reconnect heals here).
    reconcile_after_s: float = 5.0
    publish_window: int = 64  # work publishes in flight at most
    publish_timeout_s: float = 10.0
    # Dispatch up to capacity * (1 + headroom) so workers never idle between batches.
    headroom: float = 0.25
    # never | always | auto (prompt >= pd_min_prompt_tokens) | adaptive (auto, while
    # the prefill pool has room and the decode pool KV headroom)
    # Circuit breakers per worker (orchestrator/breaker.py BreakerParams as a
    # table: error_rate, min_requests, slow_factor, slow_min_ms, open_s, ...).
    breakers: bool = True
    breaker_params: dict[str, Any] = msgspec.field(default_factory=dict)
    pd_mode: str = "auto"
    pd_min_prompt_tokens: int = 512
    worker_timeout_s: float = 3.5  # no heartbeat this long: the worker is gone
    dedup_cache: int = 200_000  # request ids remembered for dedup (at least, at most 2x)
    # Look every new request's id up in LLM_DONE (batched) before holding it: an id
    # with a stored terminal gets it back and never runs again, past the duplicate
    # windows and across replicas. Costs a round trip of latency at low load.
    check_stored_terminals: bool = True


class WorkerSettings(msgspec.Struct, frozen=True, kw_only=True):
    worker_id: str = ""  # "" = generated at start
    role: str = "unified"
    model: str = "sim"
    capacity: int = 64  # sequences it takes at once
    # Token chunks: what one engine step produced for a request goes out at the
    # end of that step. With chunk_interval_ms > 0, tokens gather for at least
    # that long after a chunk (fewer messages), or until chunk_tokens wait.
    chunk_tokens: int = 16
    chunk_interval_ms: float = 0.0
    heartbeat_s: float = 1.0
    # A killed worker's work comes back to the pool after `ack_wait_s`; live
    # workers renew every `in_progress_every_s`.
    ack_wait_s: float = 5.0
    in_progress_every_s: float = 1.0
    # A work item delivered more than 1 + max_migrations times (its workers
    # died under it) ends with ErrorReply worker_failed and a dead letter.
    max_migrations: int = 3
    # This many engine errors in a row (or EngineDeadError) make the worker
    # unhealthy: it stops pulling and hands its work back.
    engine_error_limit: int = 3
    # Runs that may overlap another one claim their request (bus/claims.py):
    # redelivered or redispatched items, items that waited longer than
    # `check_after_s` in LLM_WORK, runs that streamed across a reconnect.
    claim_ttl_s: float = 3.0  # renewed every second; a dead holder blocks its request this long
    check_after_s: float = 0.5
    fetch_timeout_s: float = 2.0
    publish_timeout_s: float = 10.0
    drain_timeout_s: float = 30.0
    max_prompt_tokens: int = 0  # 0 = the engine's own limit
    # What this worker charges per 1000 tokens (Final.usage.cost; cost_optimized).
    price_in_per_1k: float = 0.0
    price_out_per_1k: float = 0.0
    # Where those prices come from, told in every Final.usage ("" = set by hand;
    # `cplane worker --price-gpu` derives them from the GPU catalogue: fleetsim/pricing.py).
    price_source: str = ""
    # GPUs its engine spans (tensor x pipeline parallel), told in heartbeats: requests
    # with that parallelism_hint may run here. 0 = the engine's own (vLLM: its
    # tensor_parallel_size x pipeline_parallel_size; others 1).
    parallelism: int = 0
    # Forward the engine's prefix-cache events (blocks stored / removed) to the
    # routers at most this often, on `<prefix>.kv.<worker_id>` (0 = never).
    kv_events_ms: float = 20.0


class SimSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Latency model of the sim engine (see docs/sim-calibration.md)."""

    zero_cost: bool = False
    # prefill_ms = a + b*sum(l) + c*sum(l^2) over prompts prefilled in a step
    prefill_a_ms: float = 5.5
    prefill_b_ms: float = 0.0192
    prefill_c_ms: float = 1.2e-6
    # decode_ms = a + b*sum(ctx) + c*batch
    decode_a_ms: float = 6.5
    decode_b_ms: float = 6.5e-5
    decode_c_ms: float = 0.01
    kv_tokens: int = 420_000  # KV cache capacity in tokens
    max_num_seqs: int = 256
    max_batched_tokens: int = 8192
    vocab_size: int = 32_000
    eos_probability: float = 0.0  # chance per token of an early EOS (deterministic hash)
    # PD: KV transfer delay before a decode starts = a + b * prompt_tokens
    kv_transfer_a_ms: float = 1.0
    kv_transfer_b_ms: float = 0.002
    # Prefix cache: prompts are hashed in blocks of this many tokens; a request
    # prefills only what follows its longest cached run of leading blocks.
    prefix_block_tokens: int = 512
    prefix_cache_tokens: int = 420_000  # LRU capacity in tokens (0 = no prefix cache)
    kv_events: bool = True  # report cache changes (workers forward them to routers)


class ApiKeyPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """One API key's tenant and limits (`gateway.api_key_policies`, keyed by the key)."""

    tenant: str
    # The most urgent priority the key may ask for (a Priority name): a request
    # above it is refused with 403, never quietly lowered. None = any.
    max_priority: str | None = None
    max_rps: float | None = None  # requests per second (token bucket, burst max(1, rps))
    max_in_flight: int | None = None  # its requests open at once (else max_streams_per_key)

    def __post_init__(self) -> None:
        from cplane.schemas.messages import PRIORITIES  # settings load before messages' users

        names = [p.value for p in PRIORITIES]
        if self.max_priority is not None and self.max_priority not in names:
            raise ValueError(f"max_priority must be one of {names}, not {self.max_priority!r}")
        if self.max_rps is not None and not self.max_rps > 0:
            raise ValueError("max_rps must be > 0")
        if self.max_in_flight is not None and self.max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")


class GatewaySettings(msgspec.Struct, frozen=True, kw_only=True):
    """`cplane gateway`: the OpenAI-compatible HTTP front door (gateway/)."""

    host: str = "127.0.0.1"
    port: int = 0  # 0 = a free port chosen at start (printed as `gateway: http://...`)
    # HTTPS: both set = TLS on the gateway's socket (PEM files; `cplane up --tls` makes them).
    tls_cert: str | None = None
    tls_key: str | None = None
    # API key -> tenant (Request.tenant). Empty (and no policies) = open, as vLLM
    # without --api-key.
    api_keys: dict[str, str] = msgspec.field(default_factory=dict)
    # API key -> tenant and limits; a key here needs no entry in api_keys (one
    # there too is overridden by this one).
    api_key_policies: dict[str, ApiKeyPolicy] = msgspec.field(default_factory=dict)
    request_timeout_s: float = 600.0  # no terminal this long: cancel, answer 504
    max_body_bytes: int = 8 << 20  # a larger body gets 413 (every endpoint but /v1/files)
    max_file_bytes: int = 256 << 20  # /v1/files: a larger upload gets 413
    retry_after_s: float = 1.0  # Retry-After when the request stream refuses (no hint)
    # Requests open at once (an SSE stream counts until its last event): over
    # either cap, 429 + Retry-After. Per key only when keys are configured.
    max_streams: int = 10_000
    max_streams_per_key: int = 1_000
    # Slow clients: the request line and headers must arrive within
    # header_timeout_s of the connection (or of the previous response), and fit
    # in max_header_bytes, else the connection is closed; a body must arrive
    # within body_timeout_s (upload_timeout_s for /v1/files), else 408.
    header_timeout_s: float = 10.0
    max_header_bytes: int = 64 << 10
    body_timeout_s: float = 30.0
    upload_timeout_s: float = 600.0
    keep_alive_timeout_s: float = 30.0  # an idle kept-alive connection is closed after this
    expose_health: bool = True  # False: /health is 404
    expose_metrics: bool = True  # False: /metrics is 404
    metrics_require_key: bool = False  # True (and keys configured): /metrics needs a valid key


class MetricsSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Prometheus `/metrics` per process (orchestrator/metrics.py, workers/metrics.py)."""

    host: str = "127.0.0.1"  # 0.0.0.0 in a pod, so Prometheus can scrape it
    # 0 = no metrics server (the default, so tests and several processes on one
    # host never collide); -1 = any free port (the process logs which).
    orchestrator_port: int = 0
    worker_port: int = 0
    recent_samples: int = 1000  # latencies per worker kept for percentiles (get_metrics)
    max_tenants: int = 100  # tenant label values per process; the rest count as "other"
    max_slo_classes: int = 32  # same for SLO class names taken from subjects


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    nats: NatsSettings = NatsSettings()
    streams: StreamsSettings = StreamsSettings()
    limits: LimitsSettings = LimitsSettings()
    orchestrator: OrchestratorSettings = OrchestratorSettings()
    worker: WorkerSettings = WorkerSettings()
    sim: SimSettings = SimSettings()
    metrics: MetricsSettings = MetricsSettings()
    gateway: GatewaySettings = GatewaySettings()

    @property
    def subjects(self) -> Subjects:
        return Subjects(prefix=self.nats.prefix)


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in env.items():
        if not key.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in key[len(ENV_PREFIX) :].split("__") if p]
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        if path:
            node[path[-1]] = value
    return tree


def load_settings(
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Defaults <- TOML file <- env vars <- keyword overrides (section dicts).

    Raises `ValueError` with the offending key when a value has the wrong type.
    """
    env = os.environ if env is None else env
    data = msgspec.to_builtins(Settings())
    path = path or env.get("CPLANE_CONFIG")
    if path:
        with open(path, "rb") as fh:
            data = _merge(data, tomllib.load(fh))
    data = _merge(data, _env_overrides(env))
    if "NATS_URL" in env and "url" not in _env_overrides(env).get("nats", {}):
        data["nats"]["url"] = env["NATS_URL"]
    data = _merge(data, overrides)
    parts = data["orchestrator"].get("partitions")
    if isinstance(parts, str):  # CPLANE__ORCHESTRATOR__PARTITIONS=m1,m2
        data["orchestrator"]["partitions"] = [p.strip() for p in parts.split(",") if p.strip()]
    try:
        return msgspec.convert(data, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ValueError(f"invalid configuration: {exc}") from exc
