"""The routing strategies and load-balancing algorithms on hand-built snapshots."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping

from cplane.orchestrator import plugins
from cplane.orchestrator.fleet import WorkerView
from cplane.orchestrator.placed_work import PlacedWork
from cplane.orchestrator.prefix_router import PrefixIndex, prompt_blocks
from cplane.orchestrator.route_context import RouteContext
from cplane.orchestrator.snapshot import DecisionTables, Pending
from cplane.schemas.messages import Role


def w(wid: str, cap: int = 4, held: int = 0, kv: float = 0.0, ttft: float = 0.0) -> WorkerView:
    return WorkerView(wid, Role.UNIFIED, ("m",), cap, held, 0, 0, kv, 0.0, ttft_ms_avg=ttft)


def p(rid: str = "r", session: str = "", blocks: tuple[int, ...] = (), tenant: str = "") -> Pending:
    return Pending(rid, 2, 0.0, 0.0, "m", 10, session=session, block_hashes=blocks, tenant=tenant)


def placed(**tokens: float) -> PlacedWork:
    out = PlacedWork()
    for wid, n in tokens.items():
        out.add(wid, n)
    return out


def pick(name: str, cands: tuple[WorkerView, ...], n: int = 1, seed: int = 0,
         state: DecisionTables | None = None, req: Pending | None = None,
         params: Mapping[str, object] | None = None) -> list[str]:
    router = plugins.build_router(name, params)
    ctx = RouteContext(state or DecisionTables(), random.Random(seed))
    out = []
    for i in range(n):
        chosen = router(cands, req or p(f"r{i}"), ctx)
        assert chosen is not None
        ctx.routed(chosen, req)
        out.append(chosen.worker_id)
    return out


def test_load_balanced_weighs_items_per_slot_and_kv_usage() -> None:
    # b holds fewer items but its KV cache is nearly full
    cands = (w("a", held=2, kv=0.1), w("b", held=1, kv=0.95))
    assert pick("load_balanced", cands) == ["a"]
    assert pick("load_balanced", cands, params={"kv_weight": 0.0, "load_weight": 1.0}) == ["b"]


def test_least_connections_counts_items_not_slots() -> None:
    cands = (w("big", cap=64, held=10), w("small", cap=4, held=3))
    assert pick("least_connections", cands) == ["small"]
    assert pick("least_loaded", cands) == ["big"]  # per slot, the big one is emptier


def test_weighted_round_robin_follows_capacity() -> None:
    cands = (w("big", cap=48), w("small", cap=16))
    got = Counter(pick("weighted_round_robin", cands, n=640))
    assert got["big"] == 480 and got["small"] == 160  # 3:1, exactly over whole cycles


def test_least_response_time_prefers_the_faster_worker_until_it_fills() -> None:
    cands = (w("fast", ttft=50.0), w("slow", ttft=200.0), w("new"))  # new: no figures yet
    assert pick("least_response_time", cands) == ["fast"]
    full = (w("fast", held=4, ttft=50.0), w("slow", ttft=60.0))
    assert pick("least_response_time", full) == ["slow"]  # 50 * 2 > 60 * 1


def test_power_of_two_never_picks_the_more_loaded_of_its_two() -> None:
    cands = tuple(w(f"w{i}", held=i) for i in range(8))
    router = plugins.build_router("power_of_two")
    rng = random.Random(3)
    picks = []
    for _ in range(400):  # the same loads every time: only the draws differ
        chosen = router(cands, p(), RouteContext(DecisionTables(), rng))
        assert chosen is not None
        picks.append(chosen.worker_id)
    got = Counter(picks)
    assert "w7" not in got  # the worse of any pair it is in
    assert got["w0"] > got["w3"] > got["w6"] > 0  # P(pick i) falls with its load


def test_affinity_sticks_to_a_session_and_moves_only_when_its_worker_goes() -> None:
    cands = tuple(w(f"w{i}") for i in range(5))
    home = {s: pick("affinity", cands, req=p(session=s))[0] for s in ("s1", "s2", "s3", "s4")}
    assert all(pick("affinity", cands, n=3, req=p(session=s)) == [h] * 3 for s, h in home.items())
    gone = home["s1"]
    rest = tuple(c for c in cands if c.worker_id != gone)
    moved = {s: pick("affinity", rest, req=p(session=s))[0] for s in home}
    assert moved["s1"] != gone
    assert all(moved[s] == h for s, h in home.items() if h != gone)  # the others stay


def test_locality_puts_equal_first_blocks_together() -> None:
    cands = tuple(w(f"w{i}") for i in range(6))
    a = pick("locality", cands, req=p(blocks=(111, 2)))
    b = pick("locality", cands, req=p(blocks=(111, 3)))
    assert a == b


def test_prefix_aware_follows_the_cached_prefix_within_the_load_slack() -> None:
    index = PrefixIndex()
    index.add("b", (1, 2, 3))
    index.add("c", (1,))
    cands = (w("a", cap=100), w("b", cap=100), w("c", cap=100))
    req = p(blocks=(1, 2, 3, 4))
    assert pick("prefix_aware", cands, state=DecisionTables(prefix=index), req=req) == ["b"]
    busy = (w("a", cap=100), w("b", cap=100, held=70), w("c", cap=100))
    # b is 0.7 items per slot above the least loaded: out of the least loaded band (0.6)
    assert pick("prefix_aware", busy, state=DecisionTables(prefix=index), req=req) == ["c"]
    near = (w("a", cap=100), w("b", cap=100, held=20), w("c", cap=100))
    assert pick("prefix_aware", near, state=DecisionTables(prefix=index), req=req) == ["b"]
    # a plan remembers what it just routed: the second of two equal prompts follows the first
    fresh = (w("x", cap=100), w("y", cap=100))
    got = pick("prefix_aware", fresh, n=2, state=DecisionTables(prefix=PrefixIndex()), req=req)
    assert got[0] == got[1]


def test_prefix_aware_leaves_a_worker_with_too_much_placed_work() -> None:
    index = PrefixIndex()
    index.add("a", (1, 2, 3))
    cands = (w("a"), w("b"), w("c"))
    req = Pending("r", 2, 0.0, 0.0, "m", 6_000, block_hashes=(1, 2, 3))
    # a caches the prefix, but lately took far more tokens than the others
    heavy = DecisionTables(prefix=index, placed=placed(a=300e3, b=100e3, c=100e3))
    assert pick("prefix_aware", cands, state=heavy, req=req) == ["b"]
    level = DecisionTables(prefix=index, placed=placed(a=110e3, b=100e3, c=100e3))
    assert pick("prefix_aware", cands, state=level, req=req) == ["a"]
    off = {"work_slack": 0.0, "work_weight": 0.0}
    assert pick("prefix_aware", cands, state=heavy, req=req, params=off) == ["a"]
    # this plan's own routing counts too: a burst of long prompts moves on once
    # a is over the cap
    big = Pending("r", 2, 0.0, 0.0, "m", 20_000, block_hashes=(1, 2, 3))
    got = pick("prefix_aware", cands, n=12, state=level, req=big)
    assert 1 < got.count("a") < 12


def test_prefix_index_is_bounded_per_worker() -> None:
    index = PrefixIndex(blocks_per_worker=3)
    index.add("a", (1, 2, 3, 4, 5))
    assert index.match("a", (1, 2)) == 0 and index.match("a", (3, 4, 5)) == 3


def test_prompt_blocks_chain_so_equal_hashes_mean_equal_prefixes() -> None:
    x = prompt_blocks(list(range(100)), None, 16)
    y = prompt_blocks([*range(50), 999, *range(51, 100)], None, 16)
    assert len(x) == 6 and x[:3] == y[:3] and x[3:] != y[3:]  # differ from block 3 on
    assert prompt_blocks(None, "a" * 200, 16) == prompt_blocks(None, "a" * 200 + "b", 16)
    assert prompt_blocks(None, "short", 16) == ()
