"""Settings of one vLLM engine, and their translation into vLLM's engine args.

Kept free of vLLM imports at module level so the worker can load its config
(and the sim engine can run) on machines without vLLM.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from vllm.engine.arg_utils import AsyncEngineArgs

SchedulingPolicy = Literal["fcfs", "priority"]
# ExampleConnector moves KV through a shared directory (one machine, CPU ok);
# NixlConnector moves it between GPUs over RDMA/TCP.
KvConnector = Literal["ExampleConnector", "NixlConnector"]
KvRole = Literal["kv_producer", "kv_consumer", "kv_both"]
EXAMPLE_CONNECTOR_MODULE = "cplane.workers.engines.vllm.example_connector"


@dataclass(frozen=True, slots=True, kw_only=True)
class VllmSettings:
    """Everything needed to start one in-process `AsyncLLM`."""

    model: str  # local directory or HF repo id
    served_model_name: str | None = None  # the name requests use; default: model
    tokenizer: str | None = None  # default: model
    dtype: str = "auto"  # tests use "float32" (this CPU has AVX2 only; bf16 untried)
    max_model_len: int | None = None  # default: the model's own
    block_size: int | None = None  # CPU attention wants a multiple of 32
    enforce_eager: bool = False  # True skips torch.compile (fast start-up)
    # KV cache size: explicit bytes win over the utilization fraction. On CPU
    # the fraction is of host memory, so tests always give bytes.
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool = True
    # Forward the prefix cache's events (blocks stored / removed) to routers:
    # vLLM publishes them on a ZMQ socket this process reads (precise routing).
    kv_events: bool = True
    scheduling_policy: SchedulingPolicy = "fcfs"
    seed: int = 0
    # PD disaggregation; None = unified only.
    kv_connector: KvConnector | None = None
    kv_role: KvRole = "kv_both"
    kv_shared_path: str | None = None  # ExampleConnector's directory
    # Text prompts (or chat contents) longer than this many characters are
    # refused with prompt_too_long before they are tokenized. None: derived
    # from the model (tokens left after max_tokens, times the characters of
    # the longest vocabulary entry, times 2); 0: no character limit.
    max_prompt_chars: int | None = None
    # Stats windows for EngineStats (see stats.py).
    rate_window_s: float = 5.0
    prefix_window_s: float = 60.0
    # vLLM always adds its Prometheus logger to the process-global registry
    # unless a custom one replaces it; two engines in one process would fight
    # over it, so by default our stat logger takes its place.
    vllm_prometheus: bool = False
    # Any other AsyncEngineArgs field, passed as is (wins over the above).
    extra_engine_args: Mapping[str, Any] = field(default_factory=dict)

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model

    def __post_init__(self) -> None:
        if self.kv_connector == "ExampleConnector" and not self.kv_shared_path:
            raise ValueError("ExampleConnector needs kv_shared_path (a shared directory)")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError("kv_cache_memory_bytes must be positive")
        if self.max_prompt_chars is not None and self.max_prompt_chars < 0:
            raise ValueError("max_prompt_chars must be >= 0 (0 = no limit)")


def kv_transfer_config(settings: VllmSettings) -> dict[str, Any] | None:
    """The `kv_transfer_config` engine arg for the configured connector, or None."""
    if settings.kv_connector is None:
        return None
    config: dict[str, Any] = {
        "kv_connector": settings.kv_connector,
        "kv_role": settings.kv_role,
        "kv_connector_extra_config": {},
    }
    if settings.kv_connector == "ExampleConnector":
        config["kv_connector_extra_config"]["shared_storage_path"] = settings.kv_shared_path
        # Our subclass, which fixes a crash of vLLM's (see example_connector.py).
        config["kv_connector_module_path"] = EXAMPLE_CONNECTOR_MODULE
    return config


def build_engine_args(settings: VllmSettings, kv_events_endpoint: str | None = None
                      ) -> AsyncEngineArgs:
    """Translate settings into vLLM's `AsyncEngineArgs` (imports vLLM);
    `kv_events_endpoint`: where vLLM publishes its KV-cache events (ZMQ)."""
    from vllm.config import KVEventsConfig, KVTransferConfig
    from vllm.engine.arg_utils import AsyncEngineArgs

    kwargs: dict[str, Any] = {
        "model": settings.model,
        "tokenizer": settings.tokenizer,
        "served_model_name": settings.model_name,
        "dtype": settings.dtype,
        "enforce_eager": settings.enforce_eager,
        "gpu_memory_utilization": settings.gpu_memory_utilization,
        "kv_cache_memory_bytes": settings.kv_cache_memory_bytes,
        "enable_prefix_caching": settings.enable_prefix_caching,
        "scheduling_policy": settings.scheduling_policy,
        "seed": settings.seed,
    }
    optional = {
        "max_model_len": settings.max_model_len,
        "block_size": settings.block_size,
        "max_num_seqs": settings.max_num_seqs,
        "max_num_batched_tokens": settings.max_num_batched_tokens,
    }
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    kv = kv_transfer_config(settings)
    if kv is not None:
        kwargs["kv_transfer_config"] = KVTransferConfig(**kv)
    if kv_events_endpoint is not None:
        kwargs["kv_events_config"] = KVEventsConfig(
            enable_kv_cache_events=True, publisher="zmq", endpoint=kv_events_endpoint)
    kwargs.update(settings.extra_engine_args)
    return AsyncEngineArgs(**kwargs)
