"""The run ledger: every run of a work item on this worker, in one place. Pure.

A run is this worker's attempt at one work item, from its delivery to its
stored outcome. Each is a `Run` with one ordered `RunState`;
`RunLedger.transition()` is the only way a state changes, and it refuses
illegal moves. The ledger also holds the work messages waiting for runs, keyed
by stream sequence (never `id(msg)`, which CPython reuses): a message is
complete (ack it) exactly when every run it waits for has its outcome stored,
whether the run is its own or the running original of a duplicate it carries.

    (added) -> ACCEPTED -> CHECKING -> RUNNING -> STORING -> DONE -> (removed)

    CHECKING -> STORING              an outcome without the engine (cancelled before
                                     it ran, resumed up to max_tokens, refused,
                                     dead-lettered, handed off)
    ACCEPTED | CHECKING | RUNNING -> HANDING_BACK -> STORING     told to leave
    CHECKING | RUNNING | STORING -> CHECKING    not stored: tried again, checked first
    STORING -> HANDING_BACK          not stored, and the worker is leaving
    any state before DONE -> DONE    stored, skipped (its terminal was there already),
                                     given up, or cancelled

- ACCEPTED: held, its task not started yet (a task cancelled before it
  starts never runs its cleanup, so nobody cancels an ACCEPTED run).
- CHECKING: waits for the run here that it continues, then looks for what
  an earlier run stored (redeliveries) and claims the request.
- RUNNING: on the engine, streaming chunks.
- HANDING_BACK: told to leave (the worker drains or is unhealthy, or the
  engine failed on it): goes back to its model's pool with its tokens.
- STORING: its outcome (terminal, hand-off, hand-back) is being stored: it
  is never cancelled for a hand-back or a lost claim.
- DONE: stored (or given up): only its messages' acks are left.

Ordered, so "may be told to leave" is `state <= RUNNING` and "leaves the
ledger soon" is `state >= STORING`. Counts per state are O(1), and
`idle()` waits for the last run to leave (drain), without polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from nats.aio.msg import Msg

from cplane.schemas.messages import WorkItem
from cplane.workers.chunker import ChunkStream


class RunState(enum.IntEnum):
    ACCEPTED = 1
    CHECKING = 2
    RUNNING = 3
    HANDING_BACK = 4
    STORING = 5
    DONE = 6


_S = RunState
_ALLOWED: dict[RunState | None, frozenset[RunState | None]] = {
    None: frozenset({_S.ACCEPTED}),
    _S.ACCEPTED: frozenset({_S.CHECKING, _S.HANDING_BACK, _S.DONE}),
    # CHECKING/RUNNING/STORING -> CHECKING: tried again after its outcome was not stored
    _S.CHECKING: frozenset({_S.CHECKING, _S.RUNNING, _S.HANDING_BACK, _S.STORING, _S.DONE}),
    _S.RUNNING: frozenset({_S.CHECKING, _S.HANDING_BACK, _S.STORING, _S.DONE}),
    _S.HANDING_BACK: frozenset({_S.STORING, _S.DONE}),
    _S.STORING: frozenset({_S.CHECKING, _S.HANDING_BACK, _S.DONE}),
    _S.DONE: frozenset({None}),
}
# The same table as bit masks (bit 0: None), indexed by state (0: None): the
# check runs six times per request, on the hot path.
_ALLOWED_BITS = [0] * (max(RunState) + 1)
for _frm, _tos in _ALLOWED.items():
    _ALLOWED_BITS[_frm or 0] = sum(1 << (_to or 0) for _to in _tos)
_ACCEPTED, _CHECKING, _HANDING_BACK, _DONE = (
    RunState.ACCEPTED, RunState.CHECKING, RunState.HANDING_BACK, RunState.DONE)


class IllegalTransition(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class Letter:
    """A work message delivered more than 1 + max_migrations times: dead-lettered, not run."""

    seq: int
    subject: str
    deliveries: int
    data: bytes


@dataclass(slots=True, eq=False)
class Run:
    """One run of one item here. Identity is the key (a request may have two runs:
    one continuing the other, after a hand-back or hand-off came back here)."""

    item: WorkItem  # as delivered: a retry checks again from it
    check: bool = False  # look for what an earlier run stored before running it
    after: Run | None = None  # the run here it continues: that one ends first
    letter: Letter | None = None
    state: RunState | None = None
    task: asyncio.Task[None] | None = None
    running: WorkItem | None = None  # the item as it runs (after the check)
    stream: ChunkStream | None = None  # its chunks (seqs published, tokens, text)
    claimed: bool = False  # holds its request's claim (bus/claims.py)
    fault: str = ""  # what the engine raised on it: it leaves (or errors, at max attempts)
    started_ms: float = 0.0  # when it reached the engine (0: not yet): status queries
    first_token_ms: float = 0.0
    tokens: int = 0
    last_token_s: float = 0.0  # monotonic, for inter-token gaps
    seqs: set[int] = field(default_factory=set)  # held messages waiting for its outcome
    request_id: str = field(init=False)

    def __post_init__(self) -> None:
        self.request_id = self.item.request.request_id


@dataclass(slots=True)
class _Held:
    msg: Msg  # the newest delivery: the one acked
    waiting: set[Run]  # runs without a stored outcome


class RunLedger:
    def __init__(self) -> None:
        self._runs: set[Run] = set()
        self._newest: dict[str, Run] = {}  # request id -> its newest run before DONE
        self._counts = [0] * (max(RunState) + 1)
        self._by_seq: dict[int, _Held] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self.closed = False  # every run leaves: the worker drains or is unhealthy

    # -- reads -------------------------------------------------------------------
    def get(self, request_id: str) -> Run | None:
        """The request's newest run that is not DONE."""
        return self._newest.get(request_id)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._newest

    def __len__(self) -> int:
        """Runs in the ledger, DONE ones (acks going out) included."""
        return len(self._runs)

    @property
    def held(self) -> int:
        """Requests with a run here before DONE: what capacity and heartbeats count."""
        return len(self._newest)

    def count(self, state: RunState) -> int:
        return self._counts[state]

    def runs(self) -> Iterator[Run]:
        """Every run before DONE (a snapshot: transitions while iterating are safe)."""
        return (r for r in list(self._runs) if r.state is not None and r.state < RunState.DONE)

    def msgs(self) -> list[Msg]:
        """Every held message's newest delivery (for in_progress)."""
        return [h.msg for h in self._by_seq.values()]

    def holds(self, seq: int) -> bool:
        return seq in self._by_seq

    async def idle(self, timeout_s: float) -> bool:
        """Wait until no run is left (acks sent); False when `timeout_s` passed first."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        return self._idle.is_set()

    # -- the one transition function ------------------------------------------------
    def transition(self, run: Run, to: RunState | None) -> None:
        """Move `run` to `to` (None = leave the ledger); refuses illegal moves."""
        frm = run.state
        if not _ALLOWED_BITS[frm or 0] >> (to or 0) & 1:
            raise IllegalTransition(f"{run.request_id}: {frm!r} -> {to!r}")
        counts = self._counts
        if frm is None:
            self._runs.add(run)
            self._newest[run.request_id] = run  # it continues (or waits for) any older one
            self._idle.clear()
        else:
            counts[frm] -= 1
        if to is None:
            runs = self._runs
            runs.discard(run)
            if not runs:
                self._idle.set()
        else:
            counts[to] += 1
            if to is _DONE and self._newest.get(run.request_id) is run:
                del self._newest[run.request_id]
        run.state = to

    # -- what the runtime does through it ---------------------------------------------
    def add(self, item: WorkItem, *, check: bool = False, after: Run | None = None,
            letter: Letter | None = None) -> Run:
        """A new run (ACCEPTED); it is now the request's newest."""
        run = Run(item=item, check=check, after=after, letter=letter)
        self.transition(run, _ACCEPTED)
        return run

    def begin(self, run: Run) -> RunState:
        """The run's task starts, or tries again after its outcome was not stored
        (then it checks first), or goes on after an engine fault (it leaves).
        Returns where it goes: CHECKING, or HANDING_BACK once the ledger is
        closed or it was told to leave already."""
        if run.state is _HANDING_BACK:
            return _HANDING_BACK
        if run.state is not _ACCEPTED:  # tried again: part of it may be stored
            run.check = True
        to = _HANDING_BACK if self.closed else _CHECKING
        self.transition(run, to)
        return to

    def close(self) -> list[Run]:
        """Every run leaves from now on. The CHECKING and RUNNING ones move to
        HANDING_BACK and are returned: cancel their tasks. ACCEPTED ones, and
        runs added later, leave when they begin."""
        self.closed = True
        leaving = [r for r in self.runs() if r.state in (RunState.CHECKING, RunState.RUNNING)]
        for run in leaving:
            self.transition(run, RunState.HANDING_BACK)
        return leaving

    def hold(self, seq: int, msg: Msg, runs: Iterable[Run]) -> bool:
        """Hold message `seq` until each of `runs` has its outcome.
        False when it waits for nothing (ack it now)."""
        waiting = set(runs)
        if not waiting:
            return False
        self._by_seq[seq] = _Held(msg=msg, waiting=waiting)
        for run in waiting:
            run.seqs.add(seq)
        return True

    def refresh(self, seq: int, msg: Msg) -> bool:
        """A delivery of message `seq`: True (and keep `msg` for the ack) when it is
        held here already, so its runs go on."""
        held = self._by_seq.get(seq)
        if held is None:
            return False
        held.msg = msg
        return True

    def finish(self, run: Run, *, stored: bool) -> list[Msg]:
        """`run` is DONE. Stored: the messages now complete (ack them). Not stored:
        every message that waited for it, released (nak them, or leave them to a
        redelivery); their other runs go on, and settle nothing."""
        self.transition(run, _DONE)
        out: list[Msg] = []
        for seq in run.seqs:
            held = self._by_seq.get(seq)
            if held is None:
                continue
            held.waiting.discard(run)
            if not stored:
                del self._by_seq[seq]
                for other in held.waiting:
                    other.seqs.discard(seq)
                out.append(held.msg)
            elif not held.waiting:
                del self._by_seq[seq]
                out.append(held.msg)
        run.seqs.clear()
        return out


__all__ = ["IllegalTransition", "Letter", "Run", "RunLedger", "RunState"]
