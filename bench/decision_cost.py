"""Decision cost: microseconds of `plan_dispatch` per dispatched request, by router and
fleet size. Pure CPU, no broker: the decision itself, as the orchestrator runs it.

    python bench/decision_cost.py [--workers 8,64,512] [--routers ...] [--requests 256]

CPU time of this process (not wall time: other work on the machine does not count).
Each measurement plans `--requests` held requests (random prompts, a quarter
sharing prefixes) onto an idle fleet of N workers with room for all of them,
repeated until at least `--min-s` seconds have passed, with the decision
core's own tables (DecisionState): each plan is folded in and as many routed
requests finish, so loads stay level and the routers' ordered lists are kept
between plans as in the orchestrator. It prints the median over `--rounds`
of microseconds per dispatched request, the folding included.
"""

from __future__ import annotations

import argparse
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

from cplane.orchestrator.decision_state import DecisionState  # noqa: E402
from cplane.orchestrator.dispatch import DispatchConfig, plan_dispatch  # noqa: E402
from cplane.orchestrator.fleet import FleetView, WorkerView  # noqa: E402
from cplane.orchestrator.snapshot import Pending, QueueSnapshot  # noqa: E402
from cplane.schemas.messages import Role  # noqa: E402


def fleet(n: int) -> FleetView:
    return FleetView(tuple(WorkerView(f"w{i:04d}", Role.UNIFIED, ("m",), 64, i % 7, 0, 0,
                                      0.1, 0.0) for i in range(n)))


def queue(n: int, rng: random.Random) -> QueueSnapshot:
    held = []
    for i in range(n):
        shared = rng.random() < 0.25
        blocks = tuple(rng.randrange(16) if shared and j == 0 else rng.randrange(1 << 30)
                       for j in range(rng.randint(1, 8)))
        held.append(Pending(f"r{i}", 2, float(i), float(i), "m", rng.randint(100, 4000),
                            output_tokens=200, block_hashes=blocks, session=f"s{i % 50}"))
    return QueueSnapshot(((), (), tuple(held), (), ()), {})


def measure(router: str, workers: int, requests: int, rounds: int, min_s: float) -> float:
    rng = random.Random(0)
    view, snap = fleet(workers), queue(requests, rng)
    cfg = DispatchConfig.named(policy="fifo", router=router, pd="never")
    # The core's own tables: the prefix index, placed work, the routers' ordered lists.
    state = DecisionState()
    for w in view.workers[: max(1, workers // 4)]:
        state.prefix.add(w.worker_id, tuple(range(16)))
    since = state.since
    samples = []
    for _ in range(rounds):
        n = 0
        t0 = time.process_time()
        while True:
            plan = plan_dispatch(snap, view, cfg, now_ms=0.0, tables=state.tables, rng=rng)
            n += plan.dispatched
            # As the core does: fold the plan in, and (steady state) as many of the
            # requests routed earlier finish, so the fleet's loads stay as they were.
            state.applied(plan, 0.0)
            for wid, k in plan.sent.items():
                for _ in range(k):
                    since.finished_on(wid)
            if time.process_time() - t0 >= min_s:
                break
        samples.append((time.process_time() - t0) / max(1, n) * 1e6)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", default="8,64,512")
    ap.add_argument("--routers", default="pool,round_robin,least_loaded,power_of_two,"
                    "least_response_time,load_balanced,affinity,prefix_aware")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-s", type=float, default=0.2)
    args = ap.parse_args(argv)
    sizes = [int(x) for x in args.workers.split(",")]
    table = Table(title=f"plan_dispatch: microseconds per dispatched request "
                        f"({args.requests} held, median of {args.rounds})")
    table.add_column("router")
    for n in sizes:
        table.add_column(f"{n} workers", justify="right")
    table.add_column(f"{sizes[-1]} / {sizes[0]}", justify="right")
    for router in args.routers.split(","):
        us = [measure(router, n, args.requests, args.rounds, args.min_s) for n in sizes]
        table.add_row(router, *(f"{u:.1f}" for u in us), f"{us[-1] / us[0]:.1f}x")
    Console(width=120).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
