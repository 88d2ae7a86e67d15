"""Hostile input on the real request subject: every stored message ends in exactly one terminal.

Hypothesis generates message bodies (random bytes, JSON of wrong shapes,
deep nesting, invalid UTF-8, huge numbers, NaN, large bodies, reply_to and
group aimed at the system's own subjects, near-valid requests). Each is
JetStream-published to `llm.req.<prio>.<slo>` while a live orchestrator and a
sim worker run. Then: one terminal per stored message (on its own done
subject, or `llm.done.invalid.seq<N>`), never two; LLM_REQ empty; a normal
request still works.
"""

from __future__ import annotations

import collections
import itertools
import json
from collections.abc import AsyncIterator

import nats
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.msg import Msg

from cplane.client.sdk import Client
from cplane.schemas.messages import Request
from cplane.schemas.settings import Settings
from tests.natsfix import isolated_settings
from tests.stack import Running, stack
from tests.waiting import subscribed, until

_ids = itertools.count()
_FIELDS = ["request_id", "prompt", "prompt_token_ids", "messages", "max_tokens", "temperature",
           "top_p", "top_k", "stop", "seed", "group", "reply_to", "model", "priority"]
_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                       st.text(max_size=20))
_json = st.recursive(_json_leaf, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(st.sampled_from(_FIELDS) | st.text(max_size=8),
                                                kids, max_size=5)), max_leaves=12)
_own_subjects = st.sampled_from(["llm.req.high.interactive", "llm.done.i.victim", "llm.out.i.v",
                                 "llm.work.unified.any", "llm.>", "*", "_INBOX", "a b", ""])


def _uniq(body: object) -> object:
    """Give a dict body a fresh request id when it has a string one (ids must not repeat)."""
    if isinstance(body, dict) and isinstance(body.get("request_id"), str):
        body["request_id"] = f"h{next(_ids)}"
    return body


@st.composite
def near_valid(draw: st.DrawFn) -> bytes:
    body: dict[str, object] = {"request_id": "x", "prompt": "hello", "max_tokens": 3}
    for key in draw(st.lists(st.sampled_from(_FIELDS), max_size=3)):
        body[key] = draw(_json | _own_subjects)
    if draw(st.booleans()):
        body["reply_to"] = draw(_own_subjects)
    if draw(st.booleans()):
        body["group"] = draw(st.sampled_from(["invalid", "any", "i", "job-1", "a.b", ""]))
    return json.dumps(_uniq(body)).encode()


@st.composite
def raw_texts(draw: st.DrawFn) -> bytes:
    rid = f"h{next(_ids)}"
    kind = draw(st.sampled_from(["nan", "huge", "utf8", "deep", "deepobj", "large", "neg"]))
    return {
        "nan": b'{"request_id":"%s","prompt":"x","temperature":NaN}' % rid.encode(),
        "huge": b'{"request_id":"%s","prompt":"x","max_tokens":1e400}' % rid.encode(),
        "utf8": b'{"request_id":"%s","prompt":"ok \xc3\x28 \xff","max_tokens":2}' % rid.encode(),
        "deep": b"[" * draw(st.integers(1000, 100_000)),
        "deepobj": b'{"request_id":"%s","messages":' % rid.encode() + b'{"a":' * 50_000,
        "large": json.dumps({"request_id": rid, "prompt": "x" * draw(st.integers(10_000, 900_000)),
                             "max_tokens": 1}).encode(),
        "neg": json.dumps({"request_id": rid, "prompt": "x",
                           "max_tokens": draw(st.sampled_from([-1, 0, 10**12]))}).encode(),
    }[kind]


bodies = st.one_of(
    st.binary(min_size=1, max_size=300),
    _json.map(lambda v: json.dumps(_uniq(v)).encode()),
    near_valid(),
    raw_texts(),
)
PRIOS = ["critical", "high", "normal", "low", "background"]


class World:
    def __init__(self, s: Settings, run: Running, nc: nats.NATS) -> None:
        self.s, self.run, self.nc = s, run, nc
        self.js = nc.jetstream()
        self.stored = 0
        self.terminals: collections.Counter[str] = collections.Counter()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def world(nats_url: str) -> AsyncIterator[World]:
    # model_wait_s short: a generated body that is a valid request for a model nobody
    # serves (it happens, depending on the examples drawn) ends model_unavailable
    # after this wait; 30 s each made some runs take 200 s.
    s = isolated_settings(nats_url, sim={"zero_cost": True},
                          orchestrator={"model_wait_s": 1.0},
                          limits={"max_prompt_chars": 500_000})  # type: ignore[arg-type]
    async with stack(s, workers=1) as run:
        nc = await nats.connect(nats_url)
        w = World(s, run, nc)

        async def on_done(msg: Msg) -> None:
            w.terminals[msg.subject] += 1

        await nc.subscribe(s.subjects.done_all, cb=on_done)
        await subscribed(nc)
        yield w
        await nc.close()


async def publish(world: World, batch: list[tuple[bytes, str]]) -> int:
    """JetStream-publish each body; how many the stream stored."""
    stored = 0
    for body, prio in batch:
        try:
            await world.js.publish(world.s.subjects.request(prio, "standard"), body, timeout=5)
            stored += 1
        except Exception:  # refused at publish (e.g. bigger than max_payload): not accepted
            pass
    world.stored += stored
    return stored


async def all_answered(world: World) -> None:
    """Wait until every message stored so far has a terminal and LLM_REQ is empty."""

    async def done() -> bool:
        left = (await world.js.stream_info(world.s.streams.req.name)).state.messages
        return left == 0 and len(world.terminals) >= world.stored

    await until(done, 60, f"{world.stored} terminals and an empty LLM_REQ")


def assert_exactly_once(world: World) -> None:
    assert len(world.terminals) == world.stored
    assert set(world.terminals.values()) == {1}, [k for k, v in world.terminals.items() if v > 1]
    # the system's own subjects were never written by a reply_to
    assert not any(".victim" in k or k.endswith(".v") for k in world.terminals)


@settings(max_examples=80, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(batch=st.lists(st.tuples(bodies, st.sampled_from(PRIOS)), min_size=20, max_size=40))
async def test_every_stored_hostile_message_ends_in_exactly_one_terminal(
        world: World, batch: list[tuple[bytes, str]]) -> None:
    await publish(world, batch)
    await all_answered(world)
    assert_exactly_once(world)  # this batch's, and no late second one for an earlier batch


async def test_the_stack_still_serves_after_hostile_input(world: World) -> None:
    stored = await publish(world, [(b"[" * 50_000, "high"), (b"\xff\xfe", "critical"),
                                   (b'{"request_id":"z","prompt":"x","temperature":NaN}', "low"),
                                   (json.dumps({"request_id": "y", "reply_to": "llm.>",
                                                "prompt": "x"}).encode(), "normal")])
    assert stored == 4
    await all_answered(world)
    assert_exactly_once(world)
    client = Client(world.nc, world.s)
    final = await client.generate(Request(request_id="after-hostile", prompt="hi",
                                          max_tokens=4), timeout=20)
    assert final.usage.completion_tokens == 4
    assert world.run.orchestrator is not None and world.run.orchestrator.leading
