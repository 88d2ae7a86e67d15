"""The sim engine's model of one GPU, without a clock: continuous batching,
token budget, KV capacity, a prefix cache, and the step-time formula.

`SimEngine` (workers/engines/sim.py) drives it in real time; the fleet
simulator (fleetsim/) drives the very same object in virtual time, so the
live engine and the simulator cannot drift apart. Nothing here sleeps,
awaits or reads a clock: callers pass `now` in the unit they use for
`ready_at`.

    prefill_ms = a + b*sum(l - c) + c2*sum(l^2 - c^2)   (l prompt, c its cached prefix)
    decode_ms  = a + b*sum(ctx) + c*batch

A cached prefix makes the suffix cheaper in both terms: its tokens skip the
linear layers, and the suffix's attention over the whole context costs
(l - c) * (l + c) = l^2 - c^2 of the quadratic term.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cplane.schemas.blocks import chain_hashes
from cplane.schemas.settings import SimSettings


@dataclass(slots=True, eq=False)
class CoreSeq:
    """One sequence as the batch model sees it; engines subclass it."""

    request_id: str
    prompt_len: int
    ctx: int  # tokens in context (prompt + generated so far)
    to_generate: int  # completion tokens this engine still produces
    needs_prefill: bool
    block_hashes: tuple[int, ...] = ()  # one per full prefix block of the prompt
    produced: int = 0  # completion tokens so far, resumed ones included
    cached: int = 0  # prompt tokens not prefilled here (prefix cache or KV transfer)
    kv_reserved: int = 0
    ready_at: float = 0.0  # not admitted before this (KV transfer in flight)
    done: bool = False


@dataclass(slots=True)
class Step:
    """What one engine step does; `ms` is its modelled duration."""

    admitted: list[CoreSeq]
    prefills: list[CoreSeq]
    decodes: list[CoreSeq]
    ms: float


class PrefixCache:
    """LRU of prefix block hashes; a request hits its longest cached leading run.

    With `record` set, what enters and leaves is kept for `drain()`: the cache
    events a worker forwards to routers (BlockStored / BlockRemoved, as vLLM's).
    """

    def __init__(self, capacity_blocks: int, record: bool = False) -> None:
        self.capacity = capacity_blocks
        self._blocks: OrderedDict[int, None] = OrderedDict()
        self.record = record
        self._changes: dict[int, bool] = {}  # block -> held now; net since the last drain

    def __len__(self) -> int:
        return len(self._blocks)

    def match(self, hashes: Sequence[int]) -> int:
        n = 0
        for h in hashes:
            if h not in self._blocks:
                break
            n += 1
        return n

    def insert(self, hashes: Iterable[int]) -> None:
        if self.capacity <= 0:
            return
        blocks = self._blocks
        for h in hashes:
            if h in blocks:
                blocks.move_to_end(h)
                continue
            blocks[h] = None
            if self.record:
                self._changes[h] = True
            if len(blocks) > self.capacity:
                gone, _ = blocks.popitem(last=False)
                if self.record:
                    self._changes[gone] = False

    def drain(self) -> tuple[list[int], list[int]]:
        """Blocks stored and removed since the last drain, netted: each block
        appears once, as what it is now (so order between the lists is moot)."""
        changes, self._changes = self._changes, {}
        return ([h for h, held in changes.items() if held],
                [h for h, held in changes.items() if not held])

    def blocks(self) -> list[int]:
        """Every cached block, least recently used first."""
        return list(self._blocks)


def block_hashes(token_ids: Sequence[int], block_tokens: int) -> tuple[int, ...]:
    """Chained hashes of the prompt's full blocks: equal hash = equal whole prefix
    (schemas/blocks.py: the same hashes routers look up)."""
    return chain_hashes(token_ids, block_tokens)


class StepCore:
    """Waiting queue, running batch, KV accounting and prefix cache of one engine."""

    def __init__(self, settings: SimSettings, record_cache: bool = False,
                 fused: bool = False) -> None:
        self.s = settings
        self.fused = fused  # a mixed step is one forward pass (`fused_ms`)
        self.waiting: deque[CoreSeq] = deque()
        self.running: list[CoreSeq] = []
        self.kv_used = 0
        blocks = settings.prefix_cache_tokens // max(1, settings.prefix_block_tokens)
        self.cache = PrefixCache(blocks, record_cache)
        self.prefix_hit_tokens = 0
        self.prefix_query_tokens = 0

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting

    def add(self, seq: CoreSeq) -> None:
        self.waiting.append(seq)

    def next_ready(self, now: float) -> float | None:
        """When the earliest waiting sequence may be admitted (None: nothing waits)."""
        return min((q.ready_at for q in self.waiting), default=None)

    def plan(self, now: float) -> Step | None:
        """Admit what fits and price the step; None when nothing can run now."""
        admitted = self._admit(now)
        if not self.running and not admitted:
            return None
        prefills = [q for q in admitted if q.needs_prefill]
        return Step(admitted, prefills, list(self.running), self.step_ms(prefills, self.running))

    def _admit(self, now: float) -> list[CoreSeq]:
        s = self.s
        admitted: list[CoreSeq] = []
        budget = s.max_batched_tokens
        deferred: list[CoreSeq] = []
        while self.waiting and len(self.running) + len(admitted) < s.max_num_seqs:
            seq = self.waiting[0]
            if seq.ready_at > now:
                deferred.append(self.waiting.popleft())
                continue
            if seq.needs_prefill and seq.block_hashes and self.cache.capacity > 0:
                hit = self.cache.match(seq.block_hashes) * s.prefix_block_tokens
                seq.cached = min(hit, seq.prompt_len - 1)
            need = seq.ctx + seq.to_generate
            cost = seq.ctx - seq.cached if seq.needs_prefill else 0
            if self.kv_used + need > s.kv_tokens or (admitted and cost > budget):
                break
            self.waiting.popleft()
            budget -= cost
            self.kv_used += need
            seq.kv_reserved = need
            admitted.append(seq)
        self.waiting.extendleft(reversed(deferred))
        return admitted

    def step_ms(self, prefills: Sequence[CoreSeq], decodes: Sequence[CoreSeq]) -> float:
        s = self.s
        if s.zero_cost:
            return 0.0
        ms = 0.0
        if prefills:
            lin = quad = 0
            for q in prefills:
                lin += q.ctx - q.cached
                quad += q.ctx * q.ctx - q.cached * q.cached
            ms += s.prefill_a_ms + s.prefill_b_ms * lin + s.prefill_c_ms * quad
        if decodes:
            ms += s.decode_a_ms + s.decode_b_ms * sum(q.ctx for q in decodes) + (
                s.decode_c_ms * len(decodes))
            if self.fused and prefills:
                return fused_ms(s, ms, len(decodes))
        return ms

    def decode_run_ms(self, k: int) -> float:
        """Duration of the next k decode-only steps of the running batch, unchanged:
        each step adds one token of context to every sequence."""
        s = self.s
        n = len(self.running)
        if s.zero_cost or n == 0 or k <= 0:
            return 0.0
        ctx = sum(q.ctx for q in self.running)
        return k * (s.decode_a_ms + s.decode_c_ms * n + s.decode_b_ms * ctx) + (
            s.decode_b_ms * n * k * (k - 1) / 2)

    def begin(self, step: Step) -> None:
        """The step ran: its admitted sequences join the batch (prefix stats, cache)."""
        for q in step.prefills:
            if q.block_hashes:
                self.prefix_query_tokens += q.prompt_len
                self.prefix_hit_tokens += q.cached
                self.cache.insert(q.block_hashes)
            q.needs_prefill = False
        self.running.extend(step.admitted)

    def advance(self, k: int = 1) -> None:
        """Every running sequence produced k tokens (k > 1: a decode run)."""
        for q in self.running:
            q.produced += k
            q.ctx += k
            q.to_generate -= k

    def release(self, seq: CoreSeq) -> None:
        """Free a sequence's slot and KV, wherever it is."""
        if seq.done:
            return
        seq.done = True
        self.kv_used -= seq.kv_reserved
        seq.kv_reserved = 0
        try:
            self.running.remove(seq)
        except ValueError:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass


def fused_ms(s: SimSettings, ms: float, decodes: int) -> float:
    """A step that prefills and decodes as one forward pass (vLLM V1's mixed batch with
    chunked prefill): `step_ms` prices it as a prefill pass then a decode pass (V0's
    order), so the weights are read and the step's overhead paid twice. Fused, the
    decode side's fixed cost (`decode_a_ms`) is not paid again; its tokens ride the
    prefill's linear layers instead (`prefill_b_ms` each); its KV reads remain."""
    if s.zero_cost:
        return ms
    return max(0.0, ms - s.decode_a_ms + s.prefill_b_ms * decodes)


__all__ = ["CoreSeq", "PrefixCache", "Step", "StepCore", "block_hashes", "fused_ms"]
