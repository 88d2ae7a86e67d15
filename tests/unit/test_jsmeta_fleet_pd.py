"""Small pure pieces: ack-subject parsing, the worker registry, the PD decision."""

from __future__ import annotations

from cplane.bus.jsmeta import delivered, stored_ms, stream_seq
from cplane.bus.recent import RecentIds
from cplane.orchestrator.fleet import FleetView, Registry
from cplane.orchestrator.pd_decision import PdConfig, choose_role, estimate_prompt_tokens
from cplane.schemas.messages import Heartbeat, Request, Role


def test_ack_subject_v1_and_v2() -> None:
    v1 = "$JS.ACK.LLM_REQ.orch-high.2.17.5.1700000000123456789.3"
    assert delivered(v1) == 2 and stream_seq(v1) == 17
    assert stored_ms(v1) == 1700000000123.456789
    v2 = "$JS.ACK.dom.acchash.LLM_REQ.orch-high.1.18.6.1700000000000000000.0.rand"
    assert delivered(v2) == 1 and stream_seq(v2) == 18 and stored_ms(v2) == 1700000000000.0


def test_recent_ids_forgets_oldest() -> None:
    r = RecentIds(2)
    assert r.add("a") and r.add("b") and not r.add("a")
    r.add("c")
    assert "a" in r and "b" not in r and len(r) == 2
    big = RecentIds(1000)
    for i in range(10_500):
        big.add(f"r{i}")
    assert all(f"r{i}" in big for i in range(9_500, 10_500))  # the last `limit`, always
    assert "r0" not in big and 1000 <= len(big) <= 2000
    big.discard("r10499")
    assert "r10499" not in big and big.add("r10499")


def hb(wid: str, role: Role, cap: int = 4, state: str = "ready", models: list[str] | None = None
       ) -> Heartbeat:
    return Heartbeat(worker_id=wid, role=role, models=models or ["m"], engine="sim",
                     capacity=cap, state=state)


def test_registry_expires_and_unregisters() -> None:
    reg = Registry(timeout_ms=1000)
    assert reg.observe(hb("a", Role.UNIFIED), 0.0)
    assert not reg.observe(hb("a", Role.UNIFIED), 500.0)  # same shape: no change
    assert reg.observe(hb("b", Role.UNIFIED, cap=8), 800.0)
    assert reg.snapshot(1200.0).capacity(Role.UNIFIED) == 12
    assert reg.snapshot(1700.0).capacity(Role.UNIFIED) == 8  # a is stale
    assert reg.expire(1700.0) == ["a"]
    assert reg.observe(hb("b", Role.UNIFIED, state="stopped"), 1800.0)
    assert reg.snapshot(1800.0).workers == ()
    reg.observe(hb("c", Role.UNIFIED, state="draining"), 0.0)
    assert reg.snapshot(0.0).workers == ()  # draining workers get no new work


def fleet(*roles: Role) -> object:
    reg = Registry(timeout_ms=1000)
    for i, role in enumerate(roles):
        reg.observe(hb(f"w{i}", role), 0.0)
    return reg.snapshot(0.0)


def decide(req: Request, fleet: FleetView, cfg: PdConfig) -> Role | None:
    return choose_role(req.model, estimate_prompt_tokens(req), fleet, cfg)


def test_pd_decision() -> None:
    short = Request(request_id="s", prompt="x" * 40)
    long = Request(request_id="l", prompt_token_ids=list(range(600)))
    auto, never, always = PdConfig("auto", 512), PdConfig("never"), PdConfig("always")
    all_pools = fleet(Role.UNIFIED, Role.PREFILL, Role.DECODE)
    assert decide(long, all_pools, auto) is Role.PREFILL
    assert decide(short, all_pools, auto) is Role.UNIFIED
    assert decide(long, all_pools, never) is Role.UNIFIED
    assert decide(short, all_pools, always) is Role.PREFILL
    assert decide(short, fleet(Role.PREFILL, Role.DECODE), never) is Role.PREFILL
    assert decide(long, fleet(Role.UNIFIED, Role.PREFILL), always) is Role.UNIFIED
    assert decide(long, fleet(), auto) is None
    other = Request(request_id="o", prompt="x", model="other")
    assert decide(other, all_pools, auto) is None
    assert estimate_prompt_tokens(long) == 600


def test_pool_subject_unless_models_are_mixed() -> None:
    from cplane.schemas.subjects import model_target, valid_token

    reg = Registry(timeout_ms=1000)
    reg.observe(hb("a", Role.UNIFIED, models=["m1"]), 0.0)
    reg.observe(hb("b", Role.UNIFIED, models=["m1"]), 0.0)
    one_model = reg.snapshot(0.0)
    assert one_model.whole_pool_serves(Role.UNIFIED, "m1")
    assert one_model.whole_pool_serves(Role.UNIFIED, "")
    reg.observe(hb("c", Role.UNIFIED, models=["m2"]), 0.0)
    mixed = reg.snapshot(0.0)
    assert not mixed.whole_pool_serves(Role.UNIFIED, "m1")
    assert [w.worker_id for w in mixed.of_role(Role.UNIFIED, "m2")] == ["c"]
    assert mixed.pool_capacity(("unified", "m1")) == 8 and mixed.pool_capacity(("pd", "m1")) == 0
    for name in ("meta-llama/Llama-3.1-8B", "a.b", "x" * 300):
        t = model_target(name)
        assert valid_token(t) and t.startswith("m-") and t != model_target(name + "!")


def test_adaptive_pd_disaggregates_only_while_both_sides_have_room() -> None:
    from cplane.orchestrator import plugins
    from cplane.orchestrator.fleet import FleetView, WorkerView

    def fleet(prefill_held: int, decode_kv: float) -> FleetView:
        return FleetView((
            WorkerView("u", Role.UNIFIED, ("m",), 8, 0, 0, 0, 0.0, 0.0),
            WorkerView("p", Role.PREFILL, ("m",), 4, prefill_held, 0, 0, 0.0, 0.0),
            WorkerView("d", Role.DECODE, ("m",), 8, 0, 0, 0, decode_kv, 0.0),
        ))

    decide = plugins.build_pd("adaptive", {"min_prompt_tokens": 512})
    assert decide("m", 100, fleet(0, 0.1)) is Role.UNIFIED  # short: unified
    assert decide("m", 2000, fleet(0, 0.1)) is Role.PREFILL  # long, room on both sides
    assert decide("m", 2000, fleet(4, 0.1)) is Role.UNIFIED  # prefill pool full
    assert decide("m", 2000, fleet(0, 0.9)) is Role.UNIFIED  # decode KV nearly full
