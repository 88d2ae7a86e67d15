"""Indexed routers decide as a scan over every candidate would: the ordered lists
follow every load change (plans applied or not, finishes, heartbeats), so
routing at fleet scale is O(log n) per request with the same choices."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from cplane.orchestrator import plugins
from cplane.orchestrator.fleet import RoutedSince, WorkerView
from cplane.orchestrator.placed_work import PlacedWork
from cplane.orchestrator.prefix_index import PrefixIndex
from cplane.orchestrator.prefix_router import load_band
from cplane.orchestrator.route_context import RouteContext
from cplane.orchestrator.route_index import RouteIndex
from cplane.orchestrator.snapshot import DecisionTables, Pending
from cplane.schemas.messages import Role

Key = Callable[[WorkerView, RouteContext, Sequence[WorkerView]], float]


def _clamp(x: float) -> float:
    return min(1.0, max(0.0, x))


def _mean_ttft(cands: Sequence[WorkerView]) -> float:
    known = [w.ttft_ms_avg for w in cands if w.ttft_ms_avg > 0]
    return sum(known) / len(known) if known else 1.0


# The scan each router replaced: the lowest key, ties in turn from the round-robin position.
REFERENCE: dict[str, Key] = {
    "least_loaded": lambda w, ctx, c: ctx.per_slot(w),
    "least_connections": lambda w, ctx, c: float(ctx.load(w)),
    "load_balanced": lambda w, ctx, c: 0.7 * _clamp(ctx.per_slot(w)) + 0.3 * _clamp(w.kv_usage),
    "least_response_time": lambda w, ctx, c: (w.ttft_ms_avg or _mean_ttft(c)) * (
        1.0 + ctx.per_slot(w)),
}


def scan(cands: Sequence[WorkerView], ctx: RouteContext, key: Key) -> str:
    n = len(cands)
    start = (ctx.step + ctx.steps) % n
    order = [(start + i) % n for i in range(n)]
    return cands[min(order, key=lambda i: key(cands[i], ctx, cands))].worker_id


def fleet(rng: random.Random, n: int) -> tuple[WorkerView, ...]:
    return tuple(WorkerView(f"w{i:03d}", Role.UNIFIED, ("m",), rng.choice((4, 8, 16)),
                            rng.randrange(6), 0, 0, rng.choice((0.0, 0.3, 0.9)), 0.0,
                            ttft_ms_avg=rng.choice((0.0, 50.0, 80.0)))
                 for i in range(n))


class Tables:
    """The decision core's tables as DecisionState wires them."""

    def __init__(self, index: PrefixIndex | None = None) -> None:
        self.since = RoutedSince()
        self.index = RouteIndex()
        self.since.moved = lambda wid: (self.index.invalidate() if wid is None
                                        else self.index.changed(wid))
        self.placed = PlacedWork()
        self.tables = DecisionTables(0, self.since.sent, self.since.done, self.placed,
                                     index, index=self.index)

    def apply(self, ctx: RouteContext, sent_tokens: dict[str, float]) -> None:
        self.since.routed(ctx.sent)
        self.tables.step += ctx.steps
        for wid, tokens in sent_tokens.items():
            self.placed.add(wid, tokens)
            self.index.changed(wid)


def run_events(router: str, check: Callable[[Sequence[WorkerView], Pending, RouteContext], str],
               seed: int, prefix: PrefixIndex | None = None,
               params: dict[str, object] | None = None) -> int:
    """Random plans (applied or dropped), finishes and heartbeats; every choice checked."""
    rng = random.Random(seed)
    t = Tables(prefix)
    r = plugins.build_router(router, params)
    cands = fleet(rng, rng.randint(1, 40))
    checked = 0
    for _ in range(120):
        event = rng.random()
        if event < 0.1:  # heartbeats: a new view, the counts folded in
            cands = fleet(rng, max(1, len(cands) + rng.randint(-3, 3)))
            t.since.heard_all()
        elif event < 0.3 and t.since.sent:  # a request we routed finishes
            t.since.finished_on(rng.choice(sorted(t.since.sent)))
        else:  # a plan routes a few requests
            ctx = RouteContext(t.tables, rng)
            tokens: dict[str, float] = {}
            for i in range(rng.randint(1, 6)):
                blocks = tuple(rng.randrange(3) for _ in range(rng.randint(0, 4)))
                p = Pending(f"r{i}", 2, 0.0, 0.0, "m", rng.randint(100, 20_000),
                            output_tokens=200, block_hashes=blocks)
                want = check(cands, p, ctx)
                got = r(cands, p, ctx)
                assert got is not None and got.worker_id == want, (router, seed, checked)
                checked += 1
                ctx.routed(got, p)
                tokens[got.worker_id] = tokens.get(got.worker_id, 0.0) + p.prompt_tokens + 200
            if rng.random() < 0.7:  # applied; else dropped like a plan never published
                t.apply(ctx, tokens)
                if prefix is not None:
                    for wid in ctx.sent:
                        prefix.add(wid, (rng.randrange(3),))
    return checked


def test_scored_routers_choose_as_a_scan_of_every_candidate() -> None:
    for name, key in REFERENCE.items():
        def check(c: Sequence[WorkerView], p: Pending, ctx: RouteContext, key: Key = key) -> str:
            return scan(c, ctx, key)  # read before the router takes its round-robin step

        for seed in range(12):
            assert run_events(name, check, seed) > 0


def prefix_reference(params: dict[str, float]) -> Callable[
        [Sequence[WorkerView], Pending, RouteContext], str]:
    """prefix_aware by its definition, over every candidate: in the least loaded band,
    under the work cap if any there is, the lowest work x weight - cached tokens."""
    slack, ws, floor_tokens, ww = (params["slack"], params["work_slack"],
                                   params["work_floor_tokens"], params["work_weight"])

    def choose(cands: Sequence[WorkerView], p: Pending, ctx: RouteContext) -> str:
        band = [load_band(ctx.per_slot(w), slack) for w in cands]
        near = [i for i in range(len(cands)) if band[i] == min(band)]
        cap = (1 + ws) * ctx.placed_mean(len(cands)) + floor_tokens
        strict = [i for i in near if ctx.placed(cands[i]) <= cap]
        if not p.block_hashes:
            return cands[min(near, key=lambda i: (ctx.placed_key(cands[i]), i))].worker_id
        per_block = p.prompt_tokens / len(p.block_hashes)
        return cands[min(strict or near, key=lambda i: (
            ww * ctx.placed(cands[i]) - per_block * ctx.prefix_match(cands[i], p.block_hashes),
            ctx.placed_key(cands[i]), i))].worker_id

    return choose


def test_prefix_aware_chooses_as_its_definition_over_every_candidate() -> None:
    for params in ({"slack": 0.05, "work_slack": 0.2, "work_floor_tokens": 16_384.0,
                    "work_weight": 0.01},
                   {"slack": 0.3, "work_slack": 0.05, "work_floor_tokens": 0.0,
                    "work_weight": 0.1}):
        for seed in range(12):
            # search past the fleet's size: every holder is looked at, as the definition does
            n = run_events("prefix_aware", prefix_reference(params), seed,
                           prefix=PrefixIndex(), params={**params, "search": 1000})
            assert n > 0


def test_a_steady_fleet_builds_its_lists_once() -> None:
    rng = random.Random(1)
    t = Tables()
    cands = fleet(rng, 64)
    r = plugins.build_router("least_loaded", None)
    for _ in range(50):
        ctx = RouteContext(t.tables, rng)
        for i in range(4):
            ctx.routed(r(cands, Pending(f"r{i}", 2, 0.0, 0.0, "m", 10), ctx))  # type: ignore[arg-type]
        t.apply(ctx, {})
        t.since.finished_on(rng.choice(sorted(t.since.sent)))
    assert t.index.builds == 1
    cands = fleet(rng, 64)  # a new view (heartbeats): one more build
    ctx = RouteContext(t.tables, rng)
    r(cands, Pending("x", 2, 0.0, 0.0, "m", 10), ctx)
    assert t.index.builds == 2


def test_placed_work_decays_without_a_pass_and_keeps_its_order() -> None:
    pw = PlacedWork(half_life_ms=1000.0)
    pw.add("a", 100.0)
    pw.add("b", 50.0)
    ra, rb = pw.raw("a"), pw.raw("b")
    pw.decay(1000.0)
    assert abs(pw["a"] - 50.0) < 1e-9 and abs(pw.total - 75.0) < 1e-9
    assert (pw.raw("a"), pw.raw("b")) == (ra, rb)  # stored values untouched
    pw.add("b", 100.0)  # 25 + 100
    assert abs(pw["b"] - 125.0) < 1e-9 and pw.raw("b") > pw.raw("a")
    for t in range(2, 60):  # far past the renormalization threshold
        pw.decay(t * 1000.0)
    assert pw.epoch > 0 and abs(pw["b"] / pw["a"] - 2.5) < 1e-6


def test_prefix_index_knows_who_holds_a_block_through_evictions_and_events() -> None:
    rng = random.Random(3)
    index = PrefixIndex(blocks_per_worker=5, reported_per_worker=6)
    seqs: dict[str, int] = {}
    for _ in range(2000):
        wid = f"w{rng.randrange(4)}"
        op = rng.random()
        if op < 0.5:
            index.add(wid, tuple(rng.randrange(12) for _ in range(rng.randint(1, 4))))
        elif op < 0.9:
            cleared = rng.random() < 0.1
            seqs[wid] = seqs.get(wid, 0) + 1
            index.apply(wid, "e", seqs[wid], [rng.randrange(12) for _ in range(3)],
                        [rng.randrange(12) for _ in range(2)], cleared)
        else:
            index.forget(wid)
            seqs.pop(wid, None)
        for block in range(12):  # the reverse map is exactly who has it, by either source
            want = {w for w in (f"w{i}" for i in range(4))
                    if block in index._by_worker.get(w, {}) or block in index._reported.get(w, {})}
            assert set(index.holders(block)) == want
