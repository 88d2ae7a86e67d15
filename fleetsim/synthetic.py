"""Synthetic workloads: seeded arrivals, lengths, shared prefixes, sessions and classes.

`generate(spec, seed)` draws everything from one `random.Random(seed)`, so the
same (spec, seed) always gives the same list, on any machine and Python build.

Model of a request stream:
- Arrivals: interarrival gaps are exponential ("poisson") or gamma with the
  asked coefficient of variation `cv` ("gamma"; cv > 1 is burstier than
  Poisson, cv < 1 more regular). The first request arrives at 0 ms.
- Lengths: lognormal with the given mean and shape `sigma`, rounded and
  clamped to [min, max].
- Shared prefixes: a fraction `prefix_share` of conversations belongs to one
  of `prefix_groups` groups (picked uniformly, or with Zipf weights
  1/rank**`group_skew` when that is positive); its prompt is the group's
  `prefix_tokens` (a common system prompt) followed by a drawn suffix, so its
  leading `prefix_tokens // block_tokens` block hashes are the group's.
- Sessions: a fraction `session_share` of requests is a turn of one of
  `sessions` conversations (picked uniformly). A later turn's prompt is the
  previous prompt + previous output + a new drawn message, so it repeats all
  full blocks of the previous prompt. A conversation that would outgrow
  `prompt.max` starts over. A session keeps its tenant, level and SLO class.
- Block hashes: one int per full `block_tokens` block of the prompt; fresh
  blocks get ids never used before, so equal ids always mean equal prefixes.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from cplane.fleetsim.records import TraceRequest

K = TypeVar("K", str, int)


def pick_weighted(weights: Mapping[K, float], u: float) -> K:
    """The key whose cumulative-weight interval holds u in [0, 1), keys in sorted order.

    Sorting makes the result independent of the mapping's insertion order.
    """
    keys = sorted(weights)
    total = float(sum(weights[k] for k in keys))
    if not keys or total <= 0 or any(weights[k] < 0 for k in keys):
        raise ValueError(f"weights must be non-negative with a positive sum: {dict(weights)}")
    acc = 0.0
    for k in keys:
        acc += weights[k] / total
        if u < acc:
            return k
    return keys[-1]  # u within float rounding of 1.0


@dataclass(frozen=True, slots=True)
class LengthDist:
    """Lognormal token count with the given mean, rounded and clamped to [min, max]."""

    mean: float
    sigma: float = 1.0  # shape of the underlying normal; 0 = always `mean`
    max: int = 8192
    min: int = 1

    def __post_init__(self) -> None:
        if self.mean <= 0 or self.sigma < 0 or not 0 <= self.min <= self.max:
            raise ValueError(f"bad length distribution {self}")

    def draw(self, rng: random.Random) -> int:
        # mu chosen so that E[exp(N(mu, sigma))] = mean (before clamping)
        mu = math.log(self.mean) - self.sigma**2 / 2
        return max(self.min, min(self.max, round(rng.lognormvariate(mu, self.sigma))))


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate. Needs `count` or `duration_s`; with both, stops at whichever is first."""

    rate_per_s: float = 5.0
    duration_s: float | None = None
    count: int | None = None
    arrivals: Literal["poisson", "gamma"] = "poisson"
    cv: float = 1.0  # coefficient of variation of interarrival gaps (gamma only)
    prompt: LengthDist = LengthDist(mean=1024, sigma=1.0, max=8192)
    output: LengthDist = LengthDist(mean=256, sigma=0.8, max=2048)
    block_tokens: int = 512
    prefix_groups: int = 0
    prefix_tokens: int = 1024
    prefix_share: float = 0.0  # fraction of conversations that start with a group prefix
    group_skew: float = 0.0  # Zipf exponent of group popularity (0 = uniform)
    sessions: int = 0
    session_share: float = 0.0  # fraction of requests that are a turn of a session
    tenants: Mapping[str, float] = field(default_factory=lambda: {"default": 1.0})
    levels: Mapping[int, float] = field(default_factory=lambda: {2: 1.0})
    slo_classes: Mapping[str, float] = field(default_factory=lambda: {"standard": 1.0})
    model: str = ""

    def __post_init__(self) -> None:
        if self.count is None and self.duration_s is None:
            raise ValueError("SyntheticSpec needs count or duration_s")
        if self.rate_per_s <= 0 or self.cv <= 0 or self.block_tokens <= 0:
            raise ValueError("rate_per_s, cv and block_tokens must be positive")
        if self.arrivals not in ("poisson", "gamma"):
            raise ValueError(f"unknown arrivals {self.arrivals!r}")
        if self.group_skew < 0:
            raise ValueError("group_skew must be >= 0")
        if not (0 <= self.prefix_share <= 1 and 0 <= self.session_share <= 1):
            raise ValueError("prefix_share and session_share must be in [0, 1]")
        if any(v not in range(5) for v in self.levels):
            raise ValueError(f"levels must be 0..4: {dict(self.levels)}")


@dataclass(slots=True)
class _Session:
    """A conversation's state between turns."""

    prompt: int = 0  # tokens of the last turn's prompt
    output: int = 0
    blocks: list[int] = field(default_factory=list)
    classes: tuple[str, int, str] | None = None


class _Gen:
    """One generation run: the rng, the block-id counter, group and session state."""

    def __init__(self, spec: SyntheticSpec, seed: int) -> None:
        self.spec = spec
        self.rng = random.Random(seed)
        self.next_block = 0
        per_group = spec.prefix_tokens // spec.block_tokens
        self.groups = [self.fresh(per_group) for _ in range(spec.prefix_groups)]
        weights = [1.0 / (k + 1) ** spec.group_skew for k in range(spec.prefix_groups)]
        self.group_cum = list(itertools.accumulate(w / sum(weights) for w in weights))
        self.sessions = [_Session() for _ in range(spec.sessions)]

    def fresh(self, n: int) -> list[int]:
        ids = list(range(self.next_block, self.next_block + n))
        self.next_block += n
        return ids

    def group(self) -> int:
        """A group's index: uniform (as before skew existed, so old seeds replay) or Zipf."""
        if self.spec.group_skew == 0:
            return self.rng.randrange(len(self.groups))
        return min(bisect.bisect_right(self.group_cum, self.rng.random()), len(self.groups) - 1)

    def gap_ms(self) -> float:
        s = self.spec
        if s.arrivals == "poisson":
            return self.rng.expovariate(s.rate_per_s) * 1000.0
        shape = 1.0 / s.cv**2  # gamma: cv = 1/sqrt(shape), mean = shape * scale
        return self.rng.gammavariate(shape, 1.0 / (s.rate_per_s * shape)) * 1000.0

    def classes(self) -> tuple[str, int, str]:
        r, s = self.rng, self.spec
        return (pick_weighted(s.tenants, r.random()), pick_weighted(s.levels, r.random()),
                pick_weighted(s.slo_classes, r.random()))

    def opening(self) -> tuple[int, list[int]]:
        """A conversation's first prompt: maybe a group prefix, then a drawn message."""
        s, r = self.spec, self.rng
        drawn = s.prompt.draw(r)
        if self.groups and r.random() < s.prefix_share:
            prefix = self.groups[self.group()]
            tokens = min(s.prompt.max, s.prefix_tokens + drawn)
            n = tokens // s.block_tokens
            return tokens, prefix[:n] + self.fresh(n - min(n, len(prefix)))
        return drawn, self.fresh(drawn // s.block_tokens)

    def turn(self, sess: _Session) -> tuple[int, list[int]]:
        """A session's next prompt: the history so far plus a new message."""
        s = self.spec
        if sess.prompt == 0:
            return self.opening()
        tokens = sess.prompt + sess.output + s.prompt.draw(self.rng)
        if tokens > s.prompt.max:
            return self.opening()  # the context is full: the conversation starts over
        kept = sess.blocks[: sess.prompt // s.block_tokens]
        return tokens, kept + self.fresh(tokens // s.block_tokens - len(kept))

    def request(self, i: int, t_ms: float) -> TraceRequest:
        s, r = self.spec, self.rng
        session = ""
        if self.sessions and r.random() < s.session_share:
            j = r.randrange(len(self.sessions))
            session, sess = f"s{j}", self.sessions[j]
            prompt, blocks = self.turn(sess)
            sess.classes = sess.classes or self.classes()
            tenant, level, slo = sess.classes
        else:
            sess = None
            prompt, blocks = self.opening()
            tenant, level, slo = self.classes()
        output = s.output.draw(r)
        if sess is not None:
            sess.prompt, sess.output, sess.blocks = prompt, output, blocks
        return TraceRequest(
            request_id=f"syn-{i}", arrival_ms=t_ms, prompt_tokens=prompt, output_tokens=output,
            block_hashes=tuple(blocks), tenant=tenant, level=level, slo_class=slo,
            session=session, model=s.model,
        )


def generate(spec: SyntheticSpec, seed: int) -> list[TraceRequest]:
    """Draw a workload from `spec`; the same (spec, seed) always gives the same list."""
    gen = _Gen(spec, seed)
    end_ms = math.inf if spec.duration_s is None else spec.duration_s * 1000.0
    limit = spec.count if spec.count is not None else math.inf
    out: list[TraceRequest] = []
    t = 0.0
    while len(out) < limit and t < end_ms:
        out.append(gen.request(len(out), t))
        t += gen.gap_ms()
    return out
