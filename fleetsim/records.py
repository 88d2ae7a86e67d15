"""What flows through the simulator: requests in, per-request records out."""

from __future__ import annotations

from dataclasses import dataclass, field

from cplane.schemas.settings import DEFAULT_SLO_CLASSES

# Priority levels as the live system numbers them: 0 = critical ... 4 = background.
LEVEL_NAMES = ("critical", "high", "normal", "low", "background")


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a workload, in virtual time (ms from the workload's start)."""

    request_id: str
    arrival_ms: float
    prompt_tokens: int
    output_tokens: int
    block_hashes: tuple[int, ...] = ()  # one per full prefix block; equal = shared prefix
    tenant: str = "default"
    level: int = 2  # 0 = critical ... 4 = background
    slo_class: str = "standard"
    session: str = ""
    model: str = ""  # "" = the fleet's model
    cost_budget: float | None = None


@dataclass(frozen=True, slots=True)
class SloTarget:
    """What a request of one SLO class must meet to count as good (DistServe)."""

    ttft_ms: float
    tpot_ms: float


# The orchestrator's configured classes: one source for live and simulated targets.
DEFAULT_SLOS: dict[str, SloTarget] = {
    name: SloTarget(ttft_ms=c.ttft_ms, tpot_ms=c.tpot_ms)
    for name, c in DEFAULT_SLO_CLASSES.items()
}


@dataclass(slots=True)
class RequestRecord:
    """What happened to one request (virtual ms). Filled in by the simulator."""

    req: TraceRequest
    dispatched_ms: float | None = None
    worker: str = ""
    first_token_ms: float | None = None
    last_token_ms: float | None = None
    finished_ms: float | None = None
    output_tokens: int = 0
    cached_prompt_tokens: int = 0
    rejected: str = ""  # error code when it ended without running
    cost: float = 0.0  # at the prices of the worker that served it
    itl_ms: list[tuple[float, int]] = field(default_factory=list)  # (gap, how many gaps)

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first_token_ms is None else self.first_token_ms - self.req.arrival_ms

    @property
    def e2e_ms(self) -> float | None:
        return None if self.finished_ms is None else self.finished_ms - self.req.arrival_ms

    @property
    def tpot_ms(self) -> float | None:
        """(t_last - t_first) / (n - 1); None for fewer than two tokens."""
        if self.first_token_ms is None or self.last_token_ms is None or self.output_tokens < 2:
            return None
        return (self.last_token_ms - self.first_token_ms) / (self.output_tokens - 1)

    @property
    def queue_ms(self) -> float | None:
        return None if self.dispatched_ms is None else self.dispatched_ms - self.req.arrival_ms


@dataclass(slots=True)
class RunResult:
    """One simulated run: every request's record and what the fleet did."""

    records: list[RequestRecord]
    workers: int
    duration_ms: float  # virtual time from the first arrival to the last finish
    # (virtual ms, outstanding items per worker) sampled at a fixed interval
    load_samples: list[tuple[float, tuple[int, ...]]] = field(default_factory=list)
    prefix_hit_tokens: int = 0  # prompt tokens served from a prefix cache
    prefix_query_tokens: int = 0  # prompt tokens of requests that could have hit
    prefix_block_tokens: int = 512
    prefix_cache_blocks: int = 0  # per worker; 0 = no prefix cache
    events: int = 0  # simulator events processed
    wall_s: float = 0.0
