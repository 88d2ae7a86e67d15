"""Named synthetic trace families in the Mooncake mould, sized to a fleet.

Each family is a seeded `SyntheticSpec` shape (512-token blocks like
Mooncake's `hash_ids`) that varies one of: how deep prompts share a prefix
(one short system prompt for all; groups sharing long documents, with Zipf
popularity; conversations whose context grows turn by turn), how long the
context is (means of about 4k, 12k and 32k tokens), and how bursty arrivals
are (Poisson, or gamma gaps with cv 2-4).

Sized to a fleet of N workers: the number of documents and conversations
grows with N (a bigger fleet serves more users), and so does the rate. Every
workload here (a family or a real trace) is replayed at one offered load per
worker, `LOAD_TOKENS_PER_WORKER_S` prompt + output tokens per worker-second:
the Mooncake conversation trace's own load on 8 workers, which its
publishers' cluster served. `at_load` scales any trace's arrivals to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from cplane.fleetsim.records import TraceRequest
from cplane.fleetsim.synthetic import LengthDist, SyntheticSpec, generate
from cplane.fleetsim.workload import scale_rate

# Mooncake conversation trace: 42.1k prompt + output tokens/s on 8 workers = 5,263.
LOAD_TOKENS_PER_WORKER_S = 5250.0
REQUESTS_PER_WORKER = 300  # default length of a family's workload


@dataclass(frozen=True)
class Family:
    """A workload shape; `spec(workers, count)` sizes it to a fleet."""

    name: str
    about: str  # the shape in one line, for tables
    shape: SyntheticSpec  # rate and count are set by `spec`
    groups_per_worker: float = 0.0  # shared documents (prefix groups) per worker
    sessions_per_worker: float = 0.0  # open conversations per worker
    # Offered load, in standard loads (LOAD_TOKENS_PER_WORKER_S): short prompts cost
    # less engine time per token (prefill grows with the square of the length) and
    # conversations hit more, so those families need more tokens to keep workers busy.
    load: float = 1.0

    def spec(self, workers: int, count: int) -> SyntheticSpec:
        """The shape for `workers` workers and `count` requests, at 1 request/s
        (`family_workload` rescales it to the load)."""
        if workers < 1 or count < 1:
            raise ValueError("a family needs workers >= 1 and count >= 1")
        s = self.shape
        groups = max(1, round(self.groups_per_worker * workers)) if s.prefix_groups else 0
        sessions = max(1, round(self.sessions_per_worker * workers)) if s.sessions else 0
        return replace(s, rate_per_s=1.0, count=count, duration_s=None,
                       prefix_groups=groups, sessions=sessions)


def _shape(prompt: LengthDist, output: LengthDist, **kw: Any) -> SyntheticSpec:
    return SyntheticSpec(count=1, prompt=prompt, output=output, **kw)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("system-4k",
           "one 1k-token system prompt shared by all, 4k context, Poisson",
           _shape(LengthDist(3000, 0.8, 16_384), LengthDist(300, 0.8, 2048),
                  prefix_groups=1, prefix_tokens=1024, prefix_share=1.0),
           load=3.0),
    Family("docs-12k",
           "8k-token documents (Zipf 1.0, 96 per worker) + 4k question, 12k context, Poisson",
           _shape(LengthDist(4000, 0.8, 32_768), LengthDist(300, 0.8, 2048),
                  prefix_groups=1, prefix_tokens=8192, prefix_share=0.9, group_skew=1.0),
           groups_per_worker=96, load=1.5),
    Family("chat-12k",
           "conversations growing to 32k (shared 1k system prompt), 12k context, gamma cv 2",
           _shape(LengthDist(2500, 0.8, 32_768), LengthDist(350, 0.8, 2048),
                  prefix_groups=1, prefix_tokens=1024, prefix_share=1.0,
                  sessions=1, session_share=0.9, arrivals="gamma", cv=2.0),
           sessions_per_worker=32, load=1.5),
    Family("docs-32k",
           "24k-token documents (Zipf 0.8, 12 per worker) + 8k question, 32k context, gamma cv 2",
           _shape(LengthDist(8000, 0.8, 65_536), LengthDist(300, 0.8, 2048),
                  prefix_groups=1, prefix_tokens=24_576, prefix_share=0.95, group_skew=0.8,
                  arrivals="gamma", cv=2.0),
           groups_per_worker=12),
    Family("chat-bursty-4k",
           "short conversations up to 8k (no common prompt), 4k context, gamma cv 4",
           _shape(LengthDist(700, 0.8, 8192), LengthDist(250, 0.8, 2048),
                  sessions=1, session_share=0.95, arrivals="gamma", cv=4.0),
           sessions_per_worker=24, load=3.0),
    Family("docs-chat-12k",
           "conversations opening on 4k documents (Zipf 1.0), 12k context, gamma cv 3",
           _shape(LengthDist(1500, 0.8, 32_768), LengthDist(300, 0.8, 2048),
                  prefix_groups=1, prefix_tokens=4096, prefix_share=0.8, group_skew=1.0,
                  sessions=1, session_share=0.7, arrivals="gamma", cv=3.0),
           groups_per_worker=8, sessions_per_worker=8, load=1.5),
)}


def family(name: str) -> Family:
    """The family called `name`; ValueError naming the choices."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown family {name!r}; choose one of {sorted(FAMILIES)}") from None


def offered_tokens_per_s(reqs: Sequence[TraceRequest]) -> float:
    """Prompt + output tokens per second from the first arrival to the last (0 if < 2)."""
    if len(reqs) < 2:
        return 0.0
    span_s = (max(r.arrival_ms for r in reqs) - min(r.arrival_ms for r in reqs)) / 1000
    tokens = sum(r.prompt_tokens + r.output_tokens for r in reqs)
    return tokens / span_s if span_s > 0 else 0.0


def load_factor(reqs: Sequence[TraceRequest], workers: int,
                tokens_per_worker_s: float = LOAD_TOKENS_PER_WORKER_S) -> float:
    """The `scale_rate` factor that makes `reqs` offer `tokens_per_worker_s` to each
    of `workers` workers (1.0 when the trace has no span to scale)."""
    if workers < 1 or not tokens_per_worker_s > 0:
        raise ValueError("workers and tokens_per_worker_s must be positive")
    now = offered_tokens_per_s(reqs)
    return tokens_per_worker_s * workers / now if now > 0 else 1.0


def at_load(reqs: Sequence[TraceRequest], workers: int,
            tokens_per_worker_s: float = LOAD_TOKENS_PER_WORKER_S) -> list[TraceRequest]:
    """`reqs` with arrivals rescaled to the offered load (shape and burstiness kept)."""
    return scale_rate(reqs, load_factor(reqs, workers, tokens_per_worker_s))


def family_workload(name: str, workers: int, *, requests: int | None = None, seed: int = 0,
                    tokens_per_worker_s: float | None = None) -> list[TraceRequest]:
    """Family `name` for `workers` workers: `requests` requests (default
    `REQUESTS_PER_WORKER` per worker) offering `tokens_per_worker_s` (default: the
    family's own load); the same arguments always give the same list."""
    fam = family(name)
    count = requests if requests is not None else REQUESTS_PER_WORKER * workers
    load = tokens_per_worker_s or fam.load * LOAD_TOKENS_PER_WORKER_S
    return at_load(generate(fam.spec(workers, count), seed), workers, load)


__all__ = ["FAMILIES", "LOAD_TOKENS_PER_WORKER_S", "REQUESTS_PER_WORKER", "Family", "at_load",
           "family", "family_workload", "load_factor", "offered_tokens_per_s"]
