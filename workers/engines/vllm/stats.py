"""Turn vLLM's per-step stat records into our EngineStats.

vLLM calls its stat loggers from AsyncLLM's output handler (on our event
loop) once per batch of engine-core outputs: `SchedulerStats` carries the
queue and KV state after that step, `IterationStats` the tokens it produced.
`StatsRecorder` keeps the latest state plus a short time window of token
counts, so `EngineStats` rates are per second over the recent past.

vLLM's `StatLoggerBase` is documented as unstable; everything that touches
its records lives in this module.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cplane.workers.engines.base import EngineStats

if TYPE_CHECKING:
    from vllm.config import VllmConfig


@dataclass(slots=True)
class _Sample:
    ts: float
    prompt_tokens: int
    gen_tokens: int
    prefix_queries: int
    prefix_hits: int


class StatsRecorder:
    """Latest scheduler state plus windowed token and prefix-cache counts.

    `record()` is called by the stat logger; `snapshot()` by the engine's
    `stats()`. Both run on the engine's event loop, so no locking.
    """

    def __init__(
        self,
        *,
        rate_window_s: float = 5.0,
        prefix_window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate_window_s = rate_window_s
        self.prefix_window_s = prefix_window_s
        self._clock = clock
        self._samples: deque[_Sample] = deque()
        self._first_ts: float | None = None
        self.running = 0
        self.waiting = 0
        self.kv_usage = 0.0
        # vLLM's own prefix-cache counters since start (tokens looked up / found).
        self.prefix_queries_total = 0
        self.prefix_hits_total = 0

    def record(self, scheduler_stats: Any | None, iteration_stats: Any | None) -> None:
        now = self._clock()
        queries = hits = 0
        if scheduler_stats is not None:
            self.running = scheduler_stats.num_running_reqs
            self.waiting = scheduler_stats.num_waiting_reqs
            self.kv_usage = min(max(float(scheduler_stats.kv_cache_usage), 0.0), 1.0)
            prefix = scheduler_stats.prefix_cache_stats
            if prefix is not None:
                if prefix.reset:
                    # The cache was cleared: older hits say nothing any more.
                    for s in self._samples:
                        s.prefix_queries = s.prefix_hits = 0
                queries, hits = prefix.queries, prefix.hits
                self.prefix_queries_total += queries
                self.prefix_hits_total += hits
        prompt = gen = 0
        if iteration_stats is not None:
            prompt = iteration_stats.num_prompt_tokens
            gen = iteration_stats.num_generation_tokens
        if not (prompt or gen or queries):
            return
        if self._first_ts is None:
            self._first_ts = now
        self._samples.append(_Sample(now, prompt, gen, queries, hits))
        self._trim(now)

    def _trim(self, now: float) -> None:
        horizon = now - max(self.rate_window_s, self.prefix_window_s)
        while self._samples and self._samples[0].ts < horizon:
            self._samples.popleft()

    def snapshot(self, *, active_requests: int | None = None) -> EngineStats:
        """Stats now. `active_requests` (the engine's own count) corrects queue
        sizes that went stale: vLLM only reports after a step, and no step
        follows when the last running request is aborted."""
        now = self._clock()
        self._trim(now)
        running, waiting = self.running, self.waiting
        if active_requests is not None:
            running = min(running, active_requests)
            waiting = min(waiting, active_requests - running)
        rate_from = now - self.rate_window_s
        prompt = sum(s.prompt_tokens for s in self._samples if s.ts >= rate_from)
        gen = sum(s.gen_tokens for s in self._samples if s.ts >= rate_from)
        # A young engine has not been up for a whole window; divide by what it
        # has seen (at least 1 s, so one burst does not read as a huge rate).
        seen_s = now - self._first_ts if self._first_ts is not None else 0.0
        span = min(self.rate_window_s, max(seen_s, 1.0))
        prefix_from = now - self.prefix_window_s
        queries = sum(s.prefix_queries for s in self._samples if s.ts >= prefix_from)
        hits = sum(s.prefix_hits for s in self._samples if s.ts >= prefix_from)
        return EngineStats(
            running=running,
            waiting=waiting,
            kv_usage=self.kv_usage,
            prefix_hit_rate=hits / queries if queries else 0.0,
            prompt_tokens_per_s=prompt / span,
            gen_tokens_per_s=gen / span,
        )


def stat_logger_factory(recorder: StatsRecorder, *, replace_prometheus: bool) -> type:
    """A stat-logger class for `AsyncLLM(stat_loggers=[...])` feeding `recorder`.

    vLLM instantiates logger classes itself (`cls(vllm_config, engine_indexes)`),
    so the recorder is bound through a per-engine subclass. With
    `replace_prometheus`, the class derives from `PrometheusStatLogger`: that
    is the only way vLLM 0.32's StatLoggerManager skips adding its own
    Prometheus logger, which registers `vllm:*` metrics in the process-global
    registry and unregisters those of any other engine in the process.
    """
    from vllm.v1.metrics.loggers import AggregateStatLoggerBase, PrometheusStatLogger

    base: type = PrometheusStatLogger if replace_prometheus else AggregateStatLoggerBase

    class _RecorderStatLogger(base):
        def __init__(
            self, vllm_config: VllmConfig, engine_indexes: list[int] | None = None
        ) -> None:
            # Deliberately no super().__init__: the Prometheus base would
            # create and register its metrics.
            self.vllm_config = vllm_config
            self.engine_indexes = engine_indexes or [0]

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            recorder.record(scheduler_stats, iteration_stats)

        def log_engine_initialized(self) -> None:
            pass

        def log(self) -> None:
            pass

        def record_sleep_state(self, sleep: int = 0, level: int = 0) -> None:
            pass

        def record_admission_rejection(self, reason: str) -> None:
            pass

    return _RecorderStatLogger
