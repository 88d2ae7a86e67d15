"""A remote server's load, from its Prometheus `/metrics`, as EngineStats.

vLLM exports `vllm:num_requests_running`, `vllm:num_requests_waiting`,
`vllm:kv_cache_usage_perc` (gauges) and `vllm:prefix_cache_queries` / `_hits`,
`vllm:prompt_tokens`, `vllm:generation_tokens` (counters). Rates and the
prefix hit rate are taken between two scrapes `window_s` apart, so they follow
the recent past, not the server's lifetime. A server without these families
(any other OpenAI-compatible one) reports zeros, and the worker's own count of
what it holds there stands in for `running`.
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from cplane.workers.engines.base import EngineStats

_GAUGES = {"vllm:num_requests_running": "running", "vllm:num_requests_waiting": "waiting",
           "vllm:kv_cache_usage_perc": "kv_usage"}
_COUNTERS = {"vllm:prefix_cache_queries": "queries", "vllm:prefix_cache_hits": "hits",
             "vllm:prompt_tokens": "prompt", "vllm:generation_tokens": "gen"}


@dataclass(frozen=True, slots=True)
class Scrape:
    """One reading of the server's metrics (summed over its engines / models)."""

    at: float  # monotonic seconds
    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0
    queries: float = 0.0
    hits: float = 0.0
    prompt: float = 0.0
    gen: float = 0.0
    known: bool = False  # any vLLM family found
    block_size: int = 0  # tokens per KV block (vllm:cache_config_info), 0 = not told


def parse(text: str, at: float, model: str | None = None) -> Scrape:
    """Sum the families we read; `model`: only samples labelled with it (or unlabelled)."""
    values: dict[str, float] = {}
    known = False
    block_size = 0
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError:  # not Prometheus text: nothing known
        return Scrape(at)
    for fam in families:
        if fam.name == "vllm:cache_config_info" and fam.samples:
            with contextlib.suppress(ValueError):
                block_size = int(fam.samples[0].labels.get("block_size", "0"))
        name = _GAUGES.get(fam.name) or _COUNTERS.get(fam.name)
        if name is None:
            continue
        known = True
        for s in fam.samples:
            if s.name.endswith("_created"):
                continue
            if model is not None and s.labels.get("model_name", model) != model:
                continue
            value = float(s.value)
            # Fix: Prometheus text allows NaN and +Inf. A NaN kv usage went out in the
            # heartbeat as JSON null, which no reader decodes (the worker vanished from
            # the fleet), and int(+Inf) raised in stats(), so no heartbeat went out at
            # all. A sample that is not a finite count or share is not load.
            if not math.isfinite(value) or value < 0:
                continue
            values[name] = values.get(name, 0.0) + value
    kv = values.pop("kv_usage", 0.0)
    return Scrape(at, kv_usage=min(max(kv, 0.0), 1.0), known=known, block_size=block_size,
                  **values)


class ServerLoad:
    """Scrapes of the last `window_s` seconds -> EngineStats."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._scrapes: deque[Scrape] = deque()

    def add(self, scrape: Scrape) -> None:
        self._scrapes.append(scrape)
        while len(self._scrapes) > 2 and scrape.at - self._scrapes[1].at >= self.window_s:
            self._scrapes.popleft()

    @property
    def last(self) -> Scrape | None:
        return self._scrapes[-1] if self._scrapes else None

    def stats(self, held: int) -> EngineStats:
        """`held`: requests this worker has on the server now (stands in for an unknown
        running count; never below it: other clients' requests count too)."""
        last = self.last
        if last is None or not last.known:
            return EngineStats(running=held)
        first = self._scrapes[0]
        span = last.at - first.at
        queries = last.queries - first.queries
        rate = (lambda a, b: max(a - b, 0.0) / span) if span > 0 else (lambda a, b: 0.0)
        return EngineStats(
            running=max(int(last.running), held), waiting=int(last.waiting),
            kv_usage=last.kv_usage,
            # clamped: counters that went back (a server restart) are not a rate
            prefix_hit_rate=(min(max((last.hits - first.hits) / queries, 0.0), 1.0)
                             if queries > 0 else 0.0),
            prompt_tokens_per_s=rate(last.prompt, first.prompt),
            gen_tokens_per_s=rate(last.gen, first.gen))


__all__ = ["Scrape", "ServerLoad", "parse"]
