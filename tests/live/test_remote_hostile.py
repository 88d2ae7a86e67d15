"""The remote engine against a hostile OpenAI-compatible server (tests/remote_fakes.py).

Every way a server can break a completion must end as an in-process engine's
fault does: ServerFault (the worker retries the item elsewhere), or
EngineInputError for a request the server refuses (HTTP 400), never a hang.
Each call is bounded by BOUND_S, well under any test timeout, so a hang fails
here with its mode's name. The last tests run the same servers behind an
InstanceSupervisor with an orchestrator on a real nats-server.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS

from cplane.client.sdk import Client
from cplane.schemas.instances import InstanceSpec
from cplane.schemas.messages import ErrorCode, Final, FinishReason, Request, WorkerState
from cplane.workers.engines.base import Delta, EngineInputError, EngineRequest
from cplane.workers.engines.remote import RemoteEngine, RemoteSettings
from cplane.workers.engines.remote.server import ServerFault
from cplane.workers.instances import FrontOptions, InstanceSupervisor
from tests.natsfix import isolated_settings
from tests.remote_fakes import FIRST_TOKEN, MODES, FakeServer, free_port, token_text, tokenize
from tests.stack import stack, watch_states
from tests.waiting import until

STALL_S = 0.5  # no output for this long mid-request: a fault
PROBE_S = 0.1
BOUND_S = 5.0  # any one request, hostile or not, ends within this
PROMPT = "tell me a story"
_ids = itertools.count()


def settings(url: str, **kw: object) -> RemoteSettings:
    base: dict[str, object] = {"url": url, "model_name": "fake", "stall_timeout_s": STALL_S,
                               "probe_s": PROBE_S, "probe_timeout_s": 0.3,
                               "start_timeout_s": 2.0, "connect_timeout_s": 1.0}
    return RemoteSettings(**{**base, **kw})  # type: ignore[arg-type]


@pytest.fixture
async def fake() -> AsyncIterator[FakeServer]:
    async with FakeServer() as server:
        yield server


@pytest.fixture
async def engine(fake: FakeServer) -> AsyncIterator[RemoteEngine]:
    eng = RemoteEngine(settings(fake.url))
    await eng.start()
    yield eng
    await eng.shutdown()


def request(mode: str = "good", **kw: object) -> EngineRequest:
    """The prompt names the mode, so one server plays them all."""
    base: dict[str, object] = {"prompt": f"mode:{mode} {PROMPT}", "max_tokens": 8}
    return EngineRequest(request_id=f"{mode}-{next(_ids)}", **{**base, **kw})  # type: ignore[arg-type]


async def run(engine: RemoteEngine, req: EngineRequest, into: list[Delta] | None = None
              ) -> list[Delta]:
    """Every delta of `req` (also into `into`, so what came before a fault is seen)."""
    out = [] if into is None else into
    async with asyncio.timeout(BOUND_S):
        async for delta in engine.generate(req):
            out.append(delta)
    return out


def tokens(deltas: list[Delta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def completion(n: int, start: int = 0) -> list[int]:
    return [FIRST_TOKEN + i for i in range(start, start + n)]


# -- well-formed -------------------------------------------------------------------------
async def test_good_stream_ends_with_length(engine: RemoteEngine, fake: FakeServer) -> None:
    deltas = await run(engine, request("good"))
    last = deltas[-1]
    assert tokens(deltas) == completion(8)
    assert "".join(d.text for d in deltas) == "".join(token_text(t) for t in completion(8))
    assert last.finish_reason is FinishReason.LENGTH
    assert last.prompt_tokens == len(tokenize(f"mode:good {PROMPT}"))
    assert all(d.finish_reason is None for d in deltas[:-1])
    body = fake.bodies[-1]
    assert body["stream"] and body["return_token_ids"] and body["max_tokens"] == 8


async def test_good_stream_that_stops_early(engine: RemoteEngine, fake: FakeServer) -> None:
    fake.tokens = 3
    deltas = await run(engine, request("good"))
    assert tokens(deltas) == completion(3) and deltas[-1].finish_reason is FinishReason.STOP


async def test_a_slow_consumer_is_not_a_stalled_server(engine: RemoteEngine) -> None:
    """The no-output watchdog counts the server's time only: a consumer that holds a
    delta longer than stall_timeout_s (a worker waiting out a NATS outage) loses
    nothing."""
    got: list[Delta] = []
    async with asyncio.timeout(BOUND_S):
        async for delta in engine.generate(request("good")):
            got.append(delta)
            if len(got) == 2:
                await asyncio.sleep(STALL_S * 2)  # the thing under test: time held here
    assert tokens(got) == completion(8) and got[-1].finish_reason is FinishReason.LENGTH


async def test_usage_that_lies_is_not_believed(engine: RemoteEngine) -> None:
    """usage {"prompt_tokens": "many", cached -3}: the prompt ids the server sent count."""
    deltas = await run(engine, request("bad_usage"))
    assert tokens(deltas) == completion(8)
    assert deltas[-1].prompt_tokens == len(tokenize(f"mode:bad_usage {PROMPT}"))
    assert deltas[-1].cached_prompt_tokens == 0


async def test_a_continued_request_sends_ids_and_gets_the_rest(engine: RemoteEngine,
                                                               fake: FakeServer) -> None:
    """Tokens already streamed elsewhere: the prompt goes as ids (from /tokenize) with
    them after it, and the server continues after them."""
    req = request("good", resume_token_ids=completion(3))
    deltas = await run(engine, req)
    prompt_ids = tokenize(f"mode:good {PROMPT}")
    assert fake.bodies[-1]["prompt"] == [*prompt_ids, *completion(3)]
    assert fake.bodies[-1]["max_tokens"] == 5
    assert tokens(deltas) == completion(5, start=3)
    assert deltas[-1].prompt_tokens == len(prompt_ids)


# -- faults: each one ServerFault, for its own reason, in bounded time -------------------
FAULTS = {
    "malformed_json": "malformed SSE payload",
    "not_sse": "not an SSE line",
    "garbage_bytes": "not an SSE line",
    "never_ending_tokens": "9 tokens for max_tokens 8",
    "too_many_tokens": "9 tokens for max_tokens 8",
    "empty_forever": "no output",
    "silent": "no output|Timeout",  # the watchdog or aiohttp's sock_read, whichever first
    "keepalive_forever": "no output",
    "drop_mid_stream": "stream broken",
    "error_500": "HTTP 500",
    "error_503_stall": "HTTP 503",
    "error_mid_stream": "CUDA error: out of memory",
    "no_done": r"before \[DONE\]",
    "wrong_finish": "banana",
    "after_finish": "output after the finish",
    "token_ids_missing": "without token_ids",
    "token_ids_bool": "malformed token_ids",
    "choices_not_list": "malformed choices",
    "huge_line": "LineTooLong|larger than",
}
# Tokens a fault lets through first (the worker streams them; the next instance
# continues after them). A finishing chunk is held back until the stream proves whole:
# its token is not among them (no_done, wrong_finish, after_finish: 7 of 8).
BEFORE_FAULT = {"never_ending_tokens": 8, "drop_mid_stream": 3, "error_mid_stream": 3,
                "malformed_json": 1, "huge_line": 1, "no_done": 7, "wrong_finish": 7,
                "after_finish": 7}
REFUSED = {"error_400": ErrorCode.INVALID_REQUEST, "error_400_too_long": ErrorCode.PROMPT_TOO_LONG}


def test_every_mode_of_the_fake_is_tested() -> None:
    assert set(MODES) == {*FAULTS, *REFUSED, "good", "bad_usage"}


@pytest.mark.parametrize("mode", list(FAULTS))
async def test_a_broken_stream_is_a_server_fault(engine: RemoteEngine, fake: FakeServer,
                                                 mode: str) -> None:
    got: list[Delta] = []
    with pytest.raises(ServerFault, match=FAULTS[mode]):
        await run(engine, request(mode), got)
    assert tokens(got) == completion(BEFORE_FAULT.get(mode, 0))
    assert all(d.finish_reason is None for d in got)  # no finish ever went out
    # The server's side of the request ends too: nothing is left streaming into a
    # connection nobody reads.
    await until(lambda: fake.seen[-1].done, 3, f"the server's {mode} answer to end")
    assert engine.problem() is None  # one broken request does not make the server down


@pytest.mark.parametrize("mode", list(REFUSED))
async def test_http_400_is_an_input_error(engine: RemoteEngine, mode: str) -> None:
    with pytest.raises(EngineInputError) as err:
        await run(engine, request(mode))
    assert err.value.code == REFUSED[mode].value and "HTTP 400" in str(err.value)


# -- prefill: one whole (non-streaming) completion ----------------------------------------
async def test_good_prefill_returns_one_token_and_the_transfer(engine: RemoteEngine,
                                                               fake: FakeServer) -> None:
    (delta,) = await run(engine, request("good", prefill_only=True))
    assert delta.token_ids == completion(1) and delta.finish_reason is FinishReason.LENGTH
    assert delta.kv_transfer_params is not None
    assert delta.kv_transfer_params["remote_engine_id"] == "fake"
    assert fake.bodies[-1]["kv_transfer_params"] == {"do_remote_decode": True}
    assert not fake.bodies[-1].get("stream")


PREFILL_FAULTS = {
    "error_500": "HTTP 500",
    "silent": "Timeout",  # no byte: aiohttp's sock_read (was: no timeout at all)
    "never_ending_tokens": "not whole after",  # a body trickled forever
    "not_sse": "no JSON",
    "too_many_tokens": "2 tokens for a 1-token prefill",
}


@pytest.mark.parametrize("mode", list(PREFILL_FAULTS))
async def test_a_broken_prefill_is_a_server_fault(engine: RemoteEngine, mode: str) -> None:
    with pytest.raises(ServerFault, match=PREFILL_FAULTS[mode]):
        await run(engine, request(mode, prefill_only=True))


async def test_a_refused_prefill_is_an_input_error(engine: RemoteEngine) -> None:
    with pytest.raises(EngineInputError) as err:
        await run(engine, request("error_400", prefill_only=True))
    assert err.value.code == ErrorCode.INVALID_REQUEST.value


# -- cancel ------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["never_ending_tokens", "silent", "keepalive_forever"])
async def test_abort_ends_an_endless_stream_cancelled_and_the_server_sees_it(
        fake: FakeServer, mode: str) -> None:
    """A stall timeout far away: only the abort can end these streams in time."""
    fake.tick_s = 0.02
    eng = RemoteEngine(settings(fake.url, stall_timeout_s=60.0))
    await eng.start()
    try:
        req = request(mode, max_tokens=100_000)
        got: list[Delta] = []
        task = asyncio.create_task(run(eng, req, got))
        if mode == "never_ending_tokens":
            await until(lambda: len(got) >= 3, 3, "tokens to flow")
        else:
            await until(lambda: fake.seen and fake.seen[-1].mode == mode, 3, "the request")
        await eng.abort(req.request_id)
        async with asyncio.timeout(1.0):
            deltas = await task
        assert deltas[-1].finish_reason is FinishReason.CANCELLED
        assert all(d.finish_reason is None for d in deltas[:-1])
        async with asyncio.timeout(1.0):
            await fake.client_gone.wait()
        assert len(fake.disconnects) == 1
        await until(lambda: fake.seen[-1].done, 2, "the server's handler to end")
    finally:
        await eng.shutdown()


async def test_abort_before_the_stream_opens(engine: RemoteEngine) -> None:
    """An abort that lands while the request is being prepared (no stream yet) ends
    it as soon as the stream opens: never a request left running."""
    req = request("never_ending_tokens", max_tokens=100_000)
    agen = engine.generate(req)
    first = asyncio.create_task(agen.__anext__())  # type: ignore[attr-defined]
    await until(lambda: req.request_id in engine._active, 2, "the request to register")
    await engine.abort(req.request_id)
    async with asyncio.timeout(BOUND_S):
        deltas = [await first] + [d async for d in agen]
    assert deltas[-1].finish_reason is FinishReason.CANCELLED


# -- a server that is down, or unwell ---------------------------------------------------
async def test_connection_refused_is_a_quick_fault(fake: FakeServer) -> None:
    """The server goes away between probes (probe_s far off): requests fail at once,
    not after a timeout; the first may meet a pooled connection the server closed,
    the next finds the port closed."""
    eng = RemoteEngine(settings(fake.url, probe_s=60.0, connect_timeout_s=3.0))
    await eng.start()
    try:
        await fake.stop()
        loop = asyncio.get_running_loop()
        messages = []
        for _ in range(2):
            t0 = loop.time()
            with pytest.raises(ServerFault) as err:
                await run(eng, request("good"))
            assert loop.time() - t0 < 1.0
            messages.append(str(err.value))
        assert "ClientConnectorError" in messages[-1], messages
    finally:
        await eng.shutdown()


async def test_start_against_nothing_fails_after_its_timeout() -> None:
    eng = RemoteEngine(settings(f"http://127.0.0.1:{free_port()}", start_timeout_s=0.3))
    async with asyncio.timeout(BOUND_S):
        with pytest.raises(ServerFault, match="not healthy"):
            await eng.start()
    with pytest.raises(ServerFault, match="not started"):  # and refuses work, never hangs
        await run(eng, request("good"))


@pytest.mark.parametrize("health", ["500", "slow"])
async def test_problem_follows_the_health_probe(engine: RemoteEngine, fake: FakeServer,
                                                health: str) -> None:
    assert engine.problem() is None
    fake.health = health
    await until(lambda: engine.problem() is not None, 3, f"health {health} to be seen")
    assert ("HTTP 500" if health == "500" else "Timeout") in str(engine.problem())
    with pytest.raises(ServerFault, match=r"HTTP 500|Timeout"):  # no request goes out meanwhile
        await run(engine, request("good"))
    fake.health = "ok"
    await until(lambda: engine.problem() is None, 3, "the recovery to be seen")
    assert tokens(await run(engine, request("good"))) == completion(8)


@pytest.mark.parametrize("metrics", ["garbage", "nan"])
async def test_bad_metrics_leave_the_server_healthy_and_stats_sane(
        engine: RemoteEngine, fake: FakeServer, metrics: str) -> None:
    """A /metrics that is not Prometheus text, or that says NaN / +Inf, is no load
    figure, but neither a reason to stop serving nor to break heartbeats."""
    fake.metrics = metrics
    calls = fake.health_calls
    await until(lambda: fake.health_calls >= calls + 3, 3, "a few probes")
    assert engine.problem() is None
    st = engine.stats()
    msgspec.json.encode(st)  # finite: a heartbeat carries it
    assert st.kv_usage == 0.0 and st.running >= 0
    if metrics == "nan":  # what is finite is still read
        assert st.waiting == 1


async def test_good_metrics_become_load(engine: RemoteEngine, fake: FakeServer) -> None:
    calls = fake.health_calls
    await until(lambda: fake.health_calls >= calls + 2, 3, "two probes")
    st = engine.stats()
    assert (st.running, st.waiting, st.kv_usage) == (2, 1, 0.25)
    assert st.prefix_hit_rate == pytest.approx(0.4)


# -- a worker process fronting a good and a hostile instance ------------------------------
@pytest.mark.parametrize("hostile", ["drop_mid_stream", "never_ending_tokens"])
async def test_hostile_instance_goes_unhealthy_and_its_work_finishes_on_the_good_one(
        nats_url: str, nc: NATS, hostile: str) -> None:
    """Two instances behind one InstanceSupervisor, round robin: the hostile one's
    requests fault, move to the good one and end there, each with one Final whose
    tokens run on from what the hostile one streamed; after engine_error_limit faults
    the hostile worker says UNHEALTHY and stops taking work.

    Found here: a request handed back as the hostile worker turned unhealthy could
    reach the pull request its stopping puller still had open at the server and sit
    in an abandoned inbox for ack_wait_s (~1 run in 8). A stopping worker now keeps
    its inbox until those pull requests expire and gives what they bring back at once
    (bus/puller.py `stop(linger=True)`, Worker._accept)."""
    limit, n = 2, 6
    s = isolated_settings(
        nats_url,
        worker={"engine_error_limit": limit, "max_migrations": 3, "heartbeat_s": 0.5,
                "in_progress_every_s": 0.4, "drain_timeout_s": 0.2},
        orchestrator={"router": "round_robin", "policy": "fifo"})
    watch = await watch_states(nc, s, "bad")
    states, unhealthy = watch.states, watch.unhealthy
    # The hostile server takes a while to break (decode time between its tokens), so
    # every request is routed before it does: none is sent to its worker after that
    # worker went unhealthy and stopped (that one would wait for the orchestrator's
    # orphan sweep, every 5 s).
    async with (FakeServer() as good, FakeServer(mode=hostile, token_gap_s=0.03) as bad,
                stack(s, workers=0) as running):
        orch = running.orchestrator
        assert orch is not None
        specs = [InstanceSpec(instance_id=i, url=srv.url, model_name="fake", capacity=8)
                 for i, srv in (("good", good), ("bad", bad))]
        sup = InstanceSupervisor(s, specs, None, FrontOptions(
            stall_timeout_s=STALL_S, probe_s=PROBE_S, retry_s=0.1, cooldown_s=60.0))
        stop = asyncio.Event()
        task = asyncio.create_task(sup.run(stop))
        client = Client(await nats.connect(nats_url), s)
        try:
            await until(lambda: len(orch.registry.book) == 2, 10, "both instances' heartbeats")
            handles = await asyncio.gather(*(client.submit(
                Request(request_id=f"h{i}", prompt=PROMPT, max_tokens=8)) for i in range(n)))
            # Under ack_wait_s (5 s): no request sits in an abandoned inbox meanwhile.
            terminals = await asyncio.wait_for(
                asyncio.gather(*(h.terminal() for h in handles)),
                s.worker.ack_wait_s - 0.5)
            async with asyncio.timeout(5):
                await unhealthy.wait()
            await until(lambda: sup.fronts["bad"].problem == "engine errors in a row", 3,
                        "the supervisor to hold the hostile instance back")
        finally:
            await client.close()
            stop.set()
            await asyncio.wait_for(task, 10)
    want = "".join(token_text(t) for t in completion(8))
    for t in terminals:
        assert isinstance(t, Final), t  # the good instance always had room and time
        assert t.usage.completion_tokens == 8 and t.text == want
        assert t.finish_reason is FinishReason.LENGTH
        # never_ending_tokens streams all 8 before its 9th proves it wrong: a run that
        # picks the item up again has nothing left to do but store the Final.
        assert t.workers[-1] == "good" or hostile == "never_ending_tokens", t.workers
    moved = [t for t in terminals if isinstance(t, Final) and "bad" in t.workers]
    assert len(moved) >= limit  # the hostile one faulted on its share, and they moved
    assert states[0] is WorkerState.READY and WorkerState.UNHEALTHY in states
    assert len(bad.bodies) >= limit
    # exactly one terminal each: LLM_DONE holds one per request
    js = nc.jetstream()
    for h in handles:
        info = await js.stream_info(s.streams.done.name,
                                    subjects_filter=s.subjects.done_store(h.group, h.request_id))
        assert sum((info.state.subjects or {}).values()) == 1, h.request_id
