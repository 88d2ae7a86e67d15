"""The one small interface every engine implements (vllm, sim).

The worker runtime calls `start()` once, then `generate()` per work item
(concurrently, on one asyncio loop), `abort()` on cancel, `stats()` for each
heartbeat, and `shutdown()` once. Engines know nothing about NATS.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from cplane.schemas.messages import ChatMessage, FinishReason


class EngineInputError(ValueError):
    """The request can never succeed on this engine (bad prompt, too long...)."""

    def __init__(self, message: str, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.code = code  # an ErrorCode value


class EngineDeadError(RuntimeError):
    """The engine cannot serve anything any more (its process died): the worker
    stops pulling, reports itself unhealthy and hands its work back."""


# What a prefill hands its decode when the connector returns no params of its own
# (ExampleConnector finds the KV by the prompt's hash in its shared directory).
CONNECTOR_KEY = "connector"


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineRequest:
    """What an engine needs to run one request (built from a WorkItem)."""

    request_id: str
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[ChatMessage] | None = None
    max_tokens: int = 256  # total completion tokens, resumed ones included
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop: list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = False
    priority: int = 2  # 0 = critical ... 4 = background
    # Longest prompt (tokens) this worker accepts; 0 = the engine's own limit.
    # A longer one raises EngineInputError(code="prompt_too_long").
    max_prompt_tokens: int = 0
    # Completion tokens already streamed (migration, or the prefill's first
    # token): the engine continues after them and never repeats them.
    resume_token_ids: list[int] = field(default_factory=list)
    # Prefill role: run the prompt only (one token) and return kv_transfer_params.
    prefill_only: bool = False
    # Decode role: the prefill's kv_transfer_params (None for unified).
    kv_transfer_params: dict[str, Any] | None = None


@dataclass(slots=True, kw_only=True)
class Delta:
    """New output of one request since the last delta."""

    token_ids: list[int]
    text: str = ""
    finish_reason: FinishReason | None = None  # set on the last delta only
    prompt_tokens: int | None = None  # set at least on the last delta
    cached_prompt_tokens: int | None = None  # prompt tokens served from cache/KV transfer
    kv_transfer_params: dict[str, Any] | None = None  # prefill_only: for the decode


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineStats:
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0  # 0..1
    prefix_hit_rate: float = 0.0  # 0..1, over the recent past
    prompt_tokens_per_s: float = 0.0
    gen_tokens_per_s: float = 0.0


@dataclass(slots=True)
class KvDelta:
    """Prefix-cache changes since the last look, as hashes of schemas/blocks.py."""

    stored: list[int]
    removed: list[int]
    cleared: bool = False  # everything before `stored` is gone


@runtime_checkable
class KvEventSource(Protocol):
    """An engine that reports its prefix cache (optional: precise prefix routing)."""

    block_tokens: int  # tokens per block of its cache (hashes are over these)

    def kv_events(self) -> KvDelta | None:
        """What changed since the last call; None if nothing did."""
        ...

    def kv_blocks(self) -> list[int]:
        """Every block it holds now (a router that lost events starts over from it)."""
        ...


@runtime_checkable
class Engine(Protocol):
    name: str  # "sim" | "vllm"
    models: list[str]  # model names it serves (requests name one of these)

    async def start(self) -> None: ...

    def generate(self, req: EngineRequest) -> AsyncIterator[Delta]:
        """Yield deltas until one carries `finish_reason`.

        Raises EngineInputError for requests that can never succeed,
        EngineDeadError when the engine is gone; any other exception is an
        engine fault (the item is retried elsewhere, bounded).
        """
        ...

    async def abort(self, request_id: str) -> None:
        """Stop a running request; its generate() then ends with CANCELLED."""
        ...

    def stats(self) -> EngineStats: ...

    async def shutdown(self) -> None: ...
