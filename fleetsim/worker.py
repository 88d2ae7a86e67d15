"""One simulated worker: its slots, its engine (the live sim engine's StepCore),
and the stepping that turns engine steps into token times.

The engine is `workers.engines.stepcore.StepCore`, the object the live sim
engine runs in real time, so batching, KV capacity, the prefix cache and the
step-time formula are the live ones. What the simulator adds is the clock:
a run of decode-only steps with an unchanged batch is priced in one call
(`StepCore.decode_run_ms`) and ends at the first sequence to finish, or
earlier when new work arrives (it is cut at the step boundary in progress,
where the live engine would admit it).
"""

from __future__ import annotations

from dataclasses import dataclass

from cplane.fleetsim.records import RequestRecord
from cplane.schemas.messages import Role
from cplane.schemas.settings import SimSettings
from cplane.workers.engines.stepcore import CoreSeq, Step, StepCore


@dataclass(slots=True, eq=False)
class SimSeq(CoreSeq):
    """A sequence and the record its tokens are written into."""

    rec: RequestRecord | None = None
    prefill_only: bool = False  # PD: the prefill side produces the first token only
    started: bool = False  # has produced a token on this worker


@dataclass(slots=True)
class Item:
    """One work item in a message: the request, and for decode, the KV hand-off."""

    rec: RequestRecord
    pool: tuple[str, str]
    role: Role
    transferred: bool = False  # decode side of PD: prompt KV arrives, first token done


@dataclass(slots=True)
class Run:
    """The steps in flight: one step (maybe with prefills), or a decode-only run."""

    start_ms: float
    end_ms: float
    k: int  # steps
    step: Step | None  # the single step's plan (k == 1 with admissions)
    n: int = 0  # decode run: batch size
    ctx0: int = 0  # decode run: context tokens at its start
    version: int = 0


class SimWorker:
    """A worker with `capacity` slots; takes whole work messages while it has a free slot."""

    def __init__(self, worker_id: str, role: Role, model: str, capacity: int,
                 engine: SimSettings, max_batch: int, max_run_steps: int = 0,
                 fused_steps: bool = False) -> None:
        self.worker_id = worker_id
        self.role = role
        self.model = model
        self.capacity = capacity
        self.max_batch = max_batch
        self.max_run_steps = max_run_steps
        self.core = StepCore(engine, fused=fused_steps)
        self.held = 0  # items taken, not finished
        self.run: Run | None = None
        self.last_pull = -1.0  # when it last took a work message (its pull re-queued then)
        self.version = 0
        self.kv_seq = 0  # KV events sent (FleetSpec.kv_events_ms)

    def room_msgs(self) -> int:
        """Work messages it would fetch now (as workers/runtime.py counts them)."""
        free = self.capacity - self.held
        return 0 if free <= 0 else max(1, free // max(1, self.max_batch))

    def take(self, items: list[Item], now_ms: float, kv_delay_ms: float) -> None:
        s = self.core.s
        for it in items:
            r = it.rec.req
            self.held += 1
            if it.transferred:  # decode side: continues after the first token
                seq = SimSeq(request_id=r.request_id, prompt_len=r.prompt_tokens,
                             ctx=r.prompt_tokens + 1, to_generate=max(0, r.output_tokens - 1),
                             needs_prefill=False, produced=1, cached=r.prompt_tokens,
                             ready_at=now_ms + kv_delay_ms, rec=it.rec, started=True)
            else:
                seq = SimSeq(request_id=r.request_id, prompt_len=r.prompt_tokens,
                             ctx=r.prompt_tokens,
                             to_generate=1 if it.role is Role.PREFILL else r.output_tokens,
                             needs_prefill=True, rec=it.rec,
                             block_hashes=r.block_hashes if s.prefix_cache_tokens else (),
                             prefill_only=it.role is Role.PREFILL)
            self.core.add(seq)

    # -- stepping -------------------------------------------------------------
    def plan(self, now_ms: float) -> Run | None:
        """The next run of steps from now; None when idle (or only transfers wait)."""
        core = self.core
        step = core.plan(now_ms)
        if step is None:
            return None
        self.version += 1
        if step.admitted or core.waiting:
            return self._set(Run(now_ms, now_ms + step.ms, 1, step, version=self.version))
        # Decode only, nothing waiting: run until the first sequence finishes.
        k = max(1, min(q.to_generate for q in core.running))
        if self.max_run_steps > 0:
            k = min(k, self.max_run_steps)
        n = len(core.running)
        ctx0 = sum(q.ctx for q in core.running)
        return self._set(Run(now_ms, now_ms + core.decode_run_ms(k), k, None, n, ctx0,
                             self.version))

    def _set(self, run: Run) -> Run:
        self.run = run
        return run

    def cut(self, now_ms: float) -> Run | None:
        """New work arrived during a decode run: end it at the step boundary in progress."""
        run = self.run
        if run is None or run.step is not None or run.k <= 1:
            return None
        s = self.core.s
        base = s.decode_a_ms + s.decode_c_ms * run.n + s.decode_b_ms * run.ctx0
        inc = s.decode_b_ms * run.n

        def at(i: int) -> float:
            return run.start_ms + i * base + inc * i * (i - 1) / 2

        lo, hi = 1, run.k  # smallest i with at(i) >= now
        while lo < hi:
            mid = (lo + hi) // 2
            if at(mid) >= now_ms:
                hi = mid
            else:
                lo = mid + 1
        if lo >= run.k:
            return None
        self.version += 1
        return self._set(Run(run.start_ms, at(lo), lo, None, run.n, run.ctx0, self.version))

    def finish_run(self, run: Run) -> list[SimSeq]:
        """Apply a finished run: token times into records; the sequences that ended."""
        core = self.core
        self.run = None
        end = run.end_ms
        gap = (end - run.start_ms) / run.k
        if run.step is not None:
            core.begin(run.step)
        for q in core.running:
            assert isinstance(q, SimSeq) and q.rec is not None
            rec = q.rec
            if not q.started:  # its first token (the decode side of PD starts started)
                q.started = True
                rec.cached_prompt_tokens = q.cached
                rec.first_token_ms = end - (run.k - 1) * gap
                n_later = run.k - 1
            else:
                n_later = run.k
            if n_later:
                rec.itl_ms.append((gap, n_later))
            rec.last_token_ms = end
        core.advance(run.k)
        done = [q for q in core.running if q.to_generate <= 0]
        for q in done:
            core.release(q)
            self.held -= 1
        return done  # type: ignore[return-value]


__all__ = ["Item", "Run", "SimSeq", "SimWorker"]
