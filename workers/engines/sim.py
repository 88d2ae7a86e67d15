"""The `sim` engine: continuous batching with a calibrated latency model.

One step loop per engine, like vLLM's: each step admits waiting sequences
(within `max_num_seqs`, the token budget and KV capacity), runs their
prefill together with one decode token for every running sequence, sleeps
for the modelled step time, then emits one token per sequence. The batch
model and step-time formula live in `stepcore.StepCore`, which the fleet
simulator drives in virtual time: one model, two clocks.

Default coefficients approximate Llama-3-8B on one H100 (docs/sim-calibration.md).
`zero_cost=True` makes every step free: the overhead benchmark's setting. No time
passes between free steps, so a request's whole output (up to a bound) comes as one
delta, as from an infinitely fast engine; per-token pacing needs a step cost.
Sampling: with `temperature == 0` or a `seed`, tokens are deterministic
functions of (prompt, seed, position), so a resumed or repeated request
produces the same tokens. With `temperature > 0` and no seed they are drawn
from a fresh random generator, as real sampling is: two runs of one request
differ, so a spliced stream (a restart instead of a continuation) shows.
"""

from __future__ import annotations

import asyncio
import random
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from cplane.schemas.blocks import chat_text, word_token_ids
from cplane.schemas.messages import FinishReason
from cplane.schemas.settings import SimSettings
from cplane.workers.engines.base import Delta, EngineInputError, EngineRequest, EngineStats, KvDelta
from cplane.workers.engines.rates import RateWindow
from cplane.workers.engines.stepcore import CoreSeq, Step, StepCore, block_hashes

# Free (zero-cost) steps run back to back for at most this many tokens per loop turn.
_FREE_STEP_TOKENS = 4096

_WORDS = (
    "the of and to in is that it for on was with as be at by this had not are but from or "
    "have an they which one you were all we her she there would their will when who him "
    "been has more if no out do so can what up said about other into than its time only"
).split()
MAX_MODEL_LEN = 131_072


tokenize = word_token_ids  # deterministic word-level ids (schemas/blocks.py: routers share it)


def token_text(token_id: int) -> str:
    return " " + _WORDS[token_id % len(_WORDS)]


@dataclass(slots=True, eq=False)
class _Seq(CoreSeq):
    """A sequence plus what the live engine streams: tokens, text, a wake-up."""

    req: EngineRequest = field(default=None)  # type: ignore[assignment]
    prompt_ids: list[int] = field(default_factory=list)
    key: int = 0  # seeds the token stream (deterministic sampling)
    rng: random.Random | None = None  # sampling at temperature > 0 without a seed
    out: Delta | None = None  # output its reader has not taken yet
    waiter: asyncio.Future[None] | None = None  # the reader, waiting for `out`
    text: str = ""


class SimEngine:
    """Simulated GPU engine; implements workers.engines.base.Engine."""

    name = "sim"

    def __init__(self, settings: SimSettings, model: str = "sim") -> None:
        self.s = settings
        self.models = [model]
        self.core = StepCore(settings, record_cache=settings.kv_events)
        self.block_tokens = settings.prefix_block_tokens
        self._by_id: dict[str, _Seq] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._rates = RateWindow()
        self._rng = random.Random()  # sampling at temperature > 0 without a seed

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="sim-step-loop")

    async def shutdown(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for seq in list(self._by_id.values()):
            self._finish(seq, FinishReason.ABORT)

    def stats(self) -> EngineStats:
        prompt_rate, gen_rate = self._rates.rates()
        core = self.core
        q = core.prefix_query_tokens
        return EngineStats(
            running=len(core.running),
            waiting=len(core.waiting),
            kv_usage=core.kv_used / self.s.kv_tokens if self.s.kv_tokens else 0.0,
            prefix_hit_rate=core.prefix_hit_tokens / q if q else 0.0,
            prompt_tokens_per_s=prompt_rate,
            gen_tokens_per_s=gen_rate,
        )

    def kv_events(self) -> KvDelta | None:
        if not self.s.kv_events:
            return None
        stored, removed = self.core.cache.drain()
        return KvDelta(stored, removed) if stored or removed else None

    def kv_blocks(self) -> list[int]:
        return self.core.cache.blocks()

    async def abort(self, request_id: str) -> None:
        seq = self._by_id.get(request_id)
        if seq is not None:
            self._finish(seq, FinishReason.CANCELLED)

    # -- request side -------------------------------------------------------
    def _prompt_ids(self, req: EngineRequest) -> list[int]:
        if req.prompt_token_ids is not None:
            return list(req.prompt_token_ids)
        if req.prompt is not None:
            return tokenize(req.prompt, self.s.vocab_size)
        if req.messages is not None:
            return tokenize(chat_text(req.messages), self.s.vocab_size)
        raise EngineInputError("request has no prompt, prompt_token_ids or messages")

    def _new_seq(self, req: EngineRequest) -> _Seq:
        prompt_ids = self._prompt_ids(req)
        resumed = len(req.resume_token_ids)
        if 0 < req.max_prompt_tokens < len(prompt_ids):
            raise EngineInputError(
                f"prompt has {len(prompt_ids)} tokens, more than {req.max_prompt_tokens}",
                code="prompt_too_long",
            )
        if len(prompt_ids) + req.max_tokens > MAX_MODEL_LEN:
            raise EngineInputError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens exceeds {MAX_MODEL_LEN}",
                code="prompt_too_long",
            )
        to_generate = 1 if req.prefill_only else max(0, req.max_tokens - resumed)
        sampled = req.temperature > 0 and req.seed is None
        transferred = req.kv_transfer_params is not None
        seq = _Seq(
            request_id=req.request_id,
            prompt_len=len(prompt_ids),
            ctx=len(prompt_ids) + resumed,
            to_generate=to_generate,
            needs_prefill=not transferred,
            block_hashes=(() if transferred or self.core.cache.capacity <= 0
                          else block_hashes(prompt_ids, self.s.prefix_block_tokens)),
            produced=resumed,
            cached=len(prompt_ids) if transferred else 0,
            req=req,
            prompt_ids=prompt_ids,
            key=hash((zlib.crc32(str(prompt_ids).encode()), req.seed or 0)),
            rng=self._rng if sampled else None,
        )
        if transferred:
            delay_ms = self.s.kv_transfer_a_ms + self.s.kv_transfer_b_ms * len(prompt_ids)
            seq.ready_at = time.monotonic() + (0.0 if self.s.zero_cost else delay_ms / 1000)
        return seq

    async def generate(self, req: EngineRequest) -> AsyncIterator[Delta]:
        if req.request_id in self._by_id:
            raise EngineInputError(f"request {req.request_id} is already running here")
        seq = self._new_seq(req)
        self._by_id[req.request_id] = seq
        if seq.to_generate == 0:
            self._finish(seq, FinishReason.LENGTH)
        else:
            self.core.add(seq)
            self._wake.set()
        loop = asyncio.get_running_loop()
        try:
            while True:
                if seq.out is None:  # one bare future per wait: cheaper than an Event
                    seq.waiter = loop.create_future()
                    await seq.waiter
                delta, seq.out = seq.out, None
                if delta is None:
                    continue
                yield delta
                if delta.finish_reason is not None:
                    return
        finally:
            if not seq.done:  # the caller went away: free the slot
                self._finish(seq, FinishReason.CANCELLED)

    # -- step loop ----------------------------------------------------------
    async def _loop(self) -> None:
        core = self.core
        # Steps run back to back on a clock of their own: sleeping step.ms after
        # the loop's own work (and timers rounded to whole ms) would make every
        # step late, and the engine slower than its model by 3-10 %.
        t_next = 0.0
        while True:
            if core.idle:
                self._wake.clear()
                await self._wake.wait()
            now = time.monotonic()
            step = core.plan(now)
            if step is None:
                # Only KV transfers in flight: wait for the earliest one.
                soonest = core.next_ready(now) or now
                await asyncio.sleep(max(soonest - now, 0.0005))
                continue
            # Continue the clock unless the engine idled or fell far behind.
            t_next = (t_next if 0 <= now - t_next < 0.05 else now) + step.ms / 1000
            await asyncio.sleep(max(0.0, t_next - time.monotonic()))
            self._run(step)
            if self.s.zero_cost:
                self._free_steps()

    def _run(self, step: Step) -> None:
        self._rates.add(prompt=sum(q.ctx - q.cached for q in step.prefills), gen=0)
        self.core.begin(step)
        self._emit_tokens()

    def _free_steps(self) -> None:
        """Zero cost: no time passes between steps, so the ones that follow run at
        once and each request gets their tokens together (one delta), as from an
        infinitely fast engine, not one loop turn per token. Bounded in tokens so
        the loop still turns (heartbeats, new requests) under long outputs."""
        budget = _FREE_STEP_TOKENS
        while budget > 0 and not self.core.idle:
            step = self.core.plan(time.monotonic())
            if step is None:
                return
            budget -= len(self.core.running) + len(step.prefills)
            self._run(step)

    def _emit_tokens(self) -> None:
        core = self.core
        core.advance()
        finished: list[_Seq] = []
        for q in core.running:
            assert isinstance(q, _Seq)
            if q.done:
                continue
            if q.rng is not None:
                tid = q.rng.randrange(self.s.vocab_size)
            else:
                tid = hash((q.key, q.produced - 1)) % self.s.vocab_size
            text = token_text(tid)
            q.text += text
            reason = self._finish_reason(q, tid)
            self._emit(q, [tid], text, reason)
            if reason is not None:
                finished.append(q)
        self._rates.add(prompt=0, gen=len(core.running))
        for q in finished:
            self._release(q)

    def _finish_reason(self, q: _Seq, tid: int) -> FinishReason | None:
        req = q.req
        if not req.ignore_eos and self.s.eos_probability > 0:
            if q.rng is not None:
                draw = q.rng.random()
            else:
                draw = (hash((q.key, q.produced, "eos")) % 1_000_000) / 1e6
            if draw < self.s.eos_probability:
                return FinishReason.STOP
        if req.stop and not req.ignore_eos and any(s in q.text for s in req.stop):
            return FinishReason.STOP
        if q.to_generate <= 0:
            return FinishReason.LENGTH
        return None

    def _emit(self, q: _Seq, ids: list[int], text: str, reason: FinishReason | None) -> None:
        """Hand output to q's reader, merged into what it has not taken yet: steps
        the reader fell behind on go out as one delta (one chunk), as vLLM's output
        collector merges them."""
        last = q.out
        if last is None:
            q.out = self._delta(q, ids, text, reason)
        else:
            last.token_ids.extend(ids)
            last.text += text
            if reason is not None:
                end = self._delta(q, [], "", reason)
                last.finish_reason = reason
                last.prompt_tokens = end.prompt_tokens
                last.cached_prompt_tokens = end.cached_prompt_tokens
                last.kv_transfer_params = end.kv_transfer_params
        if q.waiter is not None and not q.waiter.done():
            q.waiter.set_result(None)

    def _delta(
        self, q: _Seq, ids: list[int], text: str, reason: FinishReason | None
    ) -> Delta:
        delta = Delta(token_ids=ids, text=text, finish_reason=reason)
        if reason is not None:
            delta.prompt_tokens = len(q.prompt_ids)
            delta.cached_prompt_tokens = q.cached
            if q.req.prefill_only:
                delta.kv_transfer_params = self._kv_params(q)
        return delta

    @staticmethod
    def _kv_params(q: _Seq) -> dict[str, Any]:
        return {"engine": "sim", "prompt_tokens": len(q.prompt_ids)}

    def _release(self, q: _Seq) -> None:
        self._by_id.pop(q.req.request_id, None)
        self.core.release(q)

    def _finish(self, q: _Seq, reason: FinishReason) -> None:
        """End a sequence early (abort, cancel, shutdown)."""
        if q.done:
            return
        self._release(q)
        self._emit(q, [], "", reason)
