"""Per-request decision cost at fleet scale: the orchestrator's dispatch step with
heartbeats from N simulated workers, microseconds of CPU per dispatched request.

Pure CPU, no broker, in virtual time: every millisecond, requests arrive (at
`--rate` a second), every worker's heartbeat arrives once a second (encoded
bytes, decoded and folded into the live `Registry`, breakers included), and
the live decision core's `step` dispatches onto the registry's snapshot, as
the orchestrator's loop does; dispatched requests finish `--service-ms` later.
What it times: heartbeat decoding and registry work, snapshots, planning.

    python bench/fleet_cost.py [--workers 2,8,64,512] [--rate 2000] [--seconds 3]
                               [--router pool]
"""

from __future__ import annotations

import argparse
import collections
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from cplane.orchestrator.breaker import Breakers  # noqa: E402
from cplane.orchestrator.core import DecisionCore  # noqa: E402
from cplane.orchestrator.dispatch import DispatchConfig  # noqa: E402
from cplane.orchestrator.fleet import Registry  # noqa: E402
from cplane.orchestrator.ledger import Entry  # noqa: E402
from cplane.orchestrator.snapshot import Pending  # noqa: E402
from cplane.schemas.codec import encode, heartbeat_decoder  # noqa: E402
from cplane.schemas.messages import Heartbeat, Role  # noqa: E402

CAPACITY = 64


class FleetLoop:
    """The orchestrator's side of one fleet, in virtual milliseconds."""

    def __init__(self, workers: int, rate: float, service_ms: float, router: str,
                 seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.rate, self.service_ms = rate, service_ms
        self.registry = Registry(timeout_ms=3500.0, breakers=Breakers())
        self.core: DecisionCore[None] = DecisionCore(
            DispatchConfig.named(policy="fifo", router=router, pd="never"),
            routed_since=self.registry.since)
        self.ids = [f"w{i:04d}" for i in range(workers)]
        self.held_by: dict[str, int] = dict.fromkeys(self.ids, 0)
        self.due: dict[int, list[str]] = collections.defaultdict(list)  # ms in the second
        for w in self.ids:
            self.due[int(self.rng.uniform(0, 1000))].append(w)
            self.registry.observe(heartbeat_decoder.decode(self.beat(w, 0.0)), 0.0)
        self.done_at: collections.deque[tuple[float, list[tuple[str, str]]]] = collections.deque()
        self.dispatched = 0
        self.carry = 0.0
        self.n = 0

    def beat(self, w: str, now: float) -> bytes:
        return encode(Heartbeat(worker_id=w, role=Role.UNIFIED, models=["m"], engine="sim",
                                capacity=CAPACITY, held_items=self.held_by[w],
                                running=self.held_by[w], served=int(now), ts_ms=now))

    def arrive(self, now: float) -> None:
        self.carry += self.rate / 1000
        while self.carry >= 1:
            self.carry -= 1
            self.core.hold(Entry(Pending(f"r{self.n}", 2, now, now, "m",
                                         self.rng.randint(100, 2000), output_tokens=200), None))
            self.n += 1

    def finish(self, now: float) -> None:
        while self.done_at and self.done_at[0][0] <= now:
            _, done = self.done_at.popleft()
            for rid, w in done:
                self.core.terminal(rid, now)
                if w in self.held_by:
                    self.held_by[w] -= 1

    def plan(self, now: float) -> None:
        step = self.core.step(self.registry.snapshot(now), now_ms=now, rng=self.rng, due=False)
        if step is None or not step.publish:
            return
        done = []
        for out in step.publish:
            self.core.stored(out.entries, now)
            done.extend((e.request_id, out.batch.target) for e in out.entries)
        self.dispatched += len(done)
        for _, w in done:
            if w in self.held_by:
                self.held_by[w] += 1
        self.done_at.append((now + self.service_ms, done))

    def run(self, seconds: float) -> float:
        """CPU microseconds per dispatched request over `seconds` of virtual time:
        heartbeat decoding and folding, snapshots and plans (the orchestrator's
        part; making requests and heartbeats is the workers' and clients')."""
        clock = time.process_time
        spent = 0.0
        for ms in range(int(seconds * 1000)):
            now = float(ms)
            self.arrive(now)
            self.finish(now)
            beats = [self.beat(w, now) for w in self.due.get(ms % 1000, ())]
            t0 = clock()
            for data in beats:
                self.registry.observe(heartbeat_decoder.decode(data), now)
            if self.core.ledger.held_count():
                self.plan(now)
            spent += clock() - t0
        return spent / max(1, self.dispatched) * 1e6


def run(workers: int, rate: float, seconds: float, service_ms: float, router: str,
        seed: int = 0) -> tuple[float, int, int]:
    """(microseconds per dispatched request, dispatched, view rebuilds)."""
    loop = FleetLoop(workers, rate, service_ms, router, seed)
    us = loop.run(seconds)
    return us, loop.dispatched, loop.registry.rebuilds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", default="2,8,64,512")
    ap.add_argument("--rate", type=float, default=2000.0, help="requests per second")
    ap.add_argument("--seconds", type=float, default=3.0, help="virtual time")
    ap.add_argument("--service-ms", type=float, default=50.0,
                    help="how long a request holds its slot (2 workers x 64 slots must "
                         "hold rate x service)")
    ap.add_argument("--routers", default="pool,power_of_two,least_loaded")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    sizes = [int(x) for x in args.workers.split(",")]
    table = Table(title=f"dispatch CPU per request, heartbeats from every worker each second "
                        f"({args.rate:.0f} req/s, {args.seconds:g} s, median of {args.rounds})")
    table.add_column("router")
    for n in sizes:
        table.add_column(f"{n} workers", justify="right")
    table.add_column(f"{sizes[-1]} / {sizes[0]}", justify="right")
    for router in args.routers.split(","):
        us = [statistics.median(run(n, args.rate, args.seconds, args.service_ms, router)[0]
                                for _ in range(args.rounds)) for n in sizes]
        table.add_row(router, *(f"{u:.1f}" for u in us), f"{us[-1] / us[0]:.2f}x")
    Console(width=140).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
