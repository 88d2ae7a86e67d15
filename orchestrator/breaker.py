"""Circuit breakers per worker, from what its heartbeats say (no I/O).

A worker that answers its heartbeats can still be bad at its work: an engine
that fails one request in two (never the three in a row that make the worker
take itself out), or one whose time per output token has grown far beyond
its peers' (TPOT is the engine's own speed; TTFT also holds the time a
request queued or waited out a dead worker elsewhere). Its
breaker opens: it gets no new work. After `open_s` it goes half-open and gets
one probe request; served without a fault, the breaker closes; a fault opens
it again for twice as long (up to `max_open_s`).

Heartbeats carry cumulative counts (`served`, `faults`); the breaker looks at
their growth over the last `window` heartbeats.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import msgspec

from cplane.schemas.messages import Heartbeat


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class BreakerParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    error_rate: float = 0.5  # faults / requests ended over the window that open it...
    min_requests: int = 4  # ...once at least this many ended there
    slow_factor: float = 4.0  # TPOT average this many times the median of its peers...
    slow_min_ms: float = 250.0  # ...and above this, opens it too
    window: int = 30  # heartbeats looked at
    open_s: float = 10.0  # open this long before a probe
    max_open_s: float = 160.0  # doubling stops here
    probe_timeout_s: float = 60.0  # a probe not served by then counts as failed


@dataclass(slots=True)
class _Track:
    worker_id: str = ""
    served: int = 0  # cumulative counts at the last heartbeat
    faults: int = 0
    recent: deque[tuple[int, int]] = field(default_factory=deque)  # (served, faults) growth
    recent_served: int = 0  # sums over `recent`
    recent_faults: int = 0
    state: BreakerState = BreakerState.CLOSED
    reason: str = ""
    opened_ms: float = 0.0
    open_ms: float = 0.0
    probe_at: tuple[int, int] | None = None  # counts when the probe was routed
    probe_ms: float = 0.0
    served_since_close: int = 0


class Breakers:
    def __init__(self, params: BreakerParams | None = None) -> None:
        self.p = params or BreakerParams()
        self._t: dict[str, _Track] = {}
        self._not_closed: set[str] = set()  # few: what per-decision reads walk
        self.opened = 0  # times any breaker opened (stats)

    def state(self, worker_id: str) -> tuple[BreakerState, str]:
        t = self._t.get(worker_id)
        return (t.state, t.reason) if t is not None else (BreakerState.CLOSED, "")

    def states(self) -> dict[str, tuple[BreakerState, str]]:
        return {w: (t.state, t.reason) for w, t in self._t.items()}

    def forget(self, worker_id: str) -> None:
        self._t.pop(worker_id, None)
        self._not_closed.discard(worker_id)

    def _open(self, t: _Track, now_ms: float, reason: str, backoff: bool) -> None:
        base = self.p.open_s * 1000
        t.open_ms = min(self.p.max_open_s * 1000, t.open_ms * 2) if backoff else base
        t.state, t.reason, t.opened_ms, t.probe_at = BreakerState.OPEN, reason, now_ms, None
        self._not_closed.add(t.worker_id)
        self.opened += 1

    def _close(self, t: _Track) -> None:
        t.state, t.reason, t.open_ms, t.probe_at = BreakerState.CLOSED, "", 0.0, None
        self._not_closed.discard(t.worker_id)
        t.recent.clear()
        t.recent_served = t.recent_faults = 0
        t.served_since_close = 0

    def observe(self, hb: Heartbeat, now_ms: float, peer_tpot_ms: float) -> bool:
        """Fold one heartbeat in; `peer_tpot_ms`: the median TPOT average of the
        worker's peers (0 = none). True when the breaker changed state."""
        t = self._t.get(hb.worker_id)
        if t is None:
            t = self._t[hb.worker_id] = _Track(hb.worker_id, hb.served, hb.faults)
        if hb.served < t.served or hb.faults < t.faults:  # a new process under the same id
            t.served, t.faults = hb.served, hb.faults
            t.recent.clear()
            t.recent_served = t.recent_faults = 0
        ds, df = hb.served - t.served, hb.faults - t.faults
        t.served, t.faults = hb.served, hb.faults
        t.recent.append((ds, df))
        t.recent_served += ds
        t.recent_faults += df
        while len(t.recent) > self.p.window:
            old_s, old_f = t.recent.popleft()
            t.recent_served -= old_s
            t.recent_faults -= old_f
        t.served_since_close += ds
        before = t.state
        if t.state is BreakerState.HALF_OPEN and t.probe_at is not None:
            if hb.faults > t.probe_at[1]:
                self._open(t, now_ms, "probe failed", backoff=True)
            elif hb.served > t.probe_at[0]:
                self._close(t)
        elif t.state is BreakerState.CLOSED:
            served, faults = t.recent_served, t.recent_faults
            ended = served + faults
            if ended >= self.p.min_requests and faults >= self.p.error_rate * ended:
                self._open(t, now_ms, f"{faults}/{ended} requests failed", backoff=False)
            elif (peer_tpot_ms > 0 and t.served_since_close >= self.p.min_requests
                  and hb.tpot_ms_avg > max(self.p.slow_min_ms,
                                           self.p.slow_factor * peer_tpot_ms)):
                self._open(t, now_ms, f"TPOT {hb.tpot_ms_avg:.0f} ms, peers "
                           f"{peer_tpot_ms:.0f} ms", backoff=False)
        return t.state is not before

    def tick(self, now_ms: float) -> bool:
        """Open breakers whose time is up go half-open; probes out too long fail.
        True if any changed."""
        changed = False
        for wid in list(self._not_closed):
            t = self._t[wid]
            if t.state is BreakerState.OPEN and now_ms - t.opened_ms >= t.open_ms:
                t.state = BreakerState.HALF_OPEN
                changed = True
            elif (t.state is BreakerState.HALF_OPEN and t.probe_at is not None
                  and now_ms - t.probe_ms > self.p.probe_timeout_s * 1000):
                self._open(t, now_ms, "probe timed out", backoff=True)
                changed = True
        return changed

    def allows(self, worker_id: str) -> bool:
        """May new work go to it? Half-open: until its probe is routed."""
        if worker_id not in self._not_closed:
            return True
        t = self._t[worker_id]
        return t.state is BreakerState.HALF_OPEN and t.probe_at is None

    def routed(self, worker_ids: Iterable[str], now_ms: float) -> bool:
        """Work went to these workers: a half-open one's probe is out. True if any was."""
        probed = False
        if not self._half_open():
            return False
        for wid in worker_ids:
            t = self._t.get(wid)
            if t is not None and t.state is BreakerState.HALF_OPEN and t.probe_at is None:
                t.probe_at, t.probe_ms = (t.served, t.faults), now_ms
                probed = True
        return probed

    def _half_open(self) -> bool:
        return any(self._t[w].state is BreakerState.HALF_OPEN for w in self._not_closed)

    def fenced(self) -> dict[str, BreakerState]:
        """Workers whose breaker is not closed (few: read per snapshot)."""
        return {w: self._t[w].state for w in self._not_closed}


def peer_median(values: Iterable[float], own: float = 0.0) -> float:
    """Median of the positive values, less one `own` (0 when none)."""
    xs = sorted(v for v in values if v > 0)
    if own > 0 and own in xs:
        xs.remove(own)
    if not xs:
        return 0.0
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


__all__ = ["BreakerParams", "BreakerState", "Breakers", "peer_median"]
