"""The remote engine's readers of what a server sends, on hand-made bytes: SSE
streams (workers/engines/remote/sse.py) and Prometheus `/metrics` text
(server_stats.py). The same breakages against a live (fake) server are in
tests/live/test_remote_hostile.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

import pytest

from cplane.workers.engines.base import EngineStats
from cplane.workers.engines.remote.server_stats import Scrape, ServerLoad, parse
from cplane.workers.engines.remote.sse import (
    MAX_EVENT_BYTES,
    ServerProtocolError,
    events,
    parse_data,
)


async def lines(raw: bytes | Iterable[bytes]) -> AsyncIterator[bytes]:
    """`raw` as aiohttp hands a body over: one line at a time, each with its ending."""
    for line in raw.splitlines(keepends=True) if isinstance(raw, bytes) else raw:
        yield line


async def read(raw: bytes | Iterable[bytes]) -> list[dict[str, object]]:
    return [obj async for obj in events(lines(raw))]


async def refused(raw: bytes | Iterable[bytes]) -> str:
    with pytest.raises(ServerProtocolError) as err:
        await read(raw)
    return str(err.value)


# -- events: what a well-formed stream gives -------------------------------------------
async def test_events_until_done() -> None:
    raw = b'data: {"a": 1}\n\ndata: {"b": 2}\n\ndata: [DONE]\n\n'
    assert await read(raw) == [{"a": 1}, {"b": 2}]


async def test_nothing_is_read_after_done() -> None:
    """[DONE] ends the stream: whatever follows (garbage too) is never looked at."""
    assert await read(b'data: {"a": 1}\n\ndata: [DONE]\n\nnot sse at all\n') == [{"a": 1}]


async def test_done_without_its_blank_line_still_ends_the_stream() -> None:
    assert await read(b'data: {"a": 1}\n\ndata: [DONE]') == [{"a": 1}]


async def test_data_lines_of_one_event_are_joined() -> None:
    assert await read(b'data: {"a":\ndata: [1, 2]}\n\ndata: [DONE]\n\n') == [{"a": [1, 2]}]


async def test_comments_and_other_fields_are_skipped() -> None:
    raw = (b": ping\n\nevent: completion\nid: 7\nretry: 100\ndata: {\"a\": 1}\n\n"
           b": ping\n\ndata: [DONE]\n\n")
    assert await read(raw) == [{"a": 1}]


async def test_crlf_and_data_without_a_space() -> None:
    assert await read(b'data:{"a": 1}\r\n\r\ndata:[DONE]\r\n\r\n') == [{"a": 1}]


async def test_an_error_object_with_choices_is_a_chunk() -> None:
    """Only an error *instead of* a completion chunk is a server error."""
    assert await read(b'data: {"error": null, "choices": []}\n\ndata: [DONE]\n\n') == [
        {"error": None, "choices": []}]


# -- events: what a broken or hostile stream raises ------------------------------------
async def test_a_line_that_is_not_sse() -> None:
    assert "not an SSE line" in await refused(b"<html><body>502 Bad Gateway</body></html>\n")


async def test_random_bytes() -> None:
    assert "not an SSE line" in await refused(bytes(range(256)) * 4)


async def test_malformed_json() -> None:
    assert "malformed SSE payload" in await refused(b'data: {"choices": [{"te\n\n')


@pytest.mark.parametrize("payload", [b"[1, 2]", b"42", b'"text"', b"null"])
async def test_a_payload_that_is_not_an_object(payload: bytes) -> None:
    assert "not an object" in await refused(b"data: " + payload + b"\n\n")


async def test_an_error_event_mid_stream() -> None:
    raw = (b'data: {"choices": [{"text": "a"}]}\n\n'
           b'data: {"error": {"message": "CUDA error: out of memory", "code": 500}}\n\n')
    assert "CUDA error: out of memory" in await refused(raw)


async def test_an_error_that_is_a_bare_string() -> None:
    assert "overloaded" in await refused(b'data: {"error": "overloaded"}\n\n')


@pytest.mark.parametrize("raw", [
    b"",  # nothing at all
    b'data: {"a": 1}\n\n',  # a chunk, then EOF
    b'data: {"a": 1}\n\n: ping\n\n',  # keepalive, then EOF
    b"data: [DON",  # cut inside the marker
], ids=["empty", "after-a-chunk", "after-a-ping", "cut-marker"])
async def test_a_stream_that_ends_before_done(raw: bytes) -> None:
    assert "before [DONE]" in await refused(raw)


async def test_an_event_too_large_in_one_line() -> None:
    assert "larger than" in await refused(b"data: " + b"x" * MAX_EVENT_BYTES + b"\n\n")


async def test_an_event_too_large_across_many_lines() -> None:
    """A blank line never comes: the event grows line by line until refused (no line is
    long by itself, so aiohttp's line limit never fires)."""
    chunk = b"data: " + b"x" * 1000 + b"\n"
    assert "larger than" in await refused([chunk] * (MAX_EVENT_BYTES // 1000 + 2))


async def test_the_size_limit_is_per_event() -> None:
    """Many events of ordinary size are fine, however long the stream."""
    one = b'data: {"p": "' + b"x" * 4000 + b'"}\n\n'
    got = await read(one * 400 + b"data: [DONE]\n\n")
    assert len(got) == 400


def test_parse_data_returns_the_object() -> None:
    assert parse_data(b'{"choices": [{"token_ids": [1, 2]}]}') == {
        "choices": [{"token_ids": [1, 2]}]}


def test_parse_data_error_message_is_short() -> None:
    with pytest.raises(ServerProtocolError) as err:
        parse_data(b'{"error": {"message": "' + b"m" * 10_000 + b'"}}')
    assert len(str(err.value)) < 300


# -- /metrics --------------------------------------------------------------------------
# As vLLM's prometheus_client writes it: a counter's TYPE line names it with `_total`,
# its `_created` is a gauge family of its own.
VLLM = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
vllm:num_requests_running{engine="0",model_name="other"} 50.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 4.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1000.0
# TYPE vllm:prefix_cache_queries_created gauge
vllm:prefix_cache_queries_created{engine="0",model_name="m"} 1.7e9
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 250.0
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="m"} 10000.0
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="m"} 500.0
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 123.0
"""


def test_parse_sums_the_model_engines() -> None:
    s = parse(VLLM, 1.0, "m")
    got = (s.running, s.waiting, s.kv_usage, s.queries, s.hits, s.prompt, s.gen, s.known)
    assert got == (5.0, 4.0, 0.5, 1000.0, 250.0, 10000.0, 500.0, True)


def test_parse_without_a_model_sums_every_model() -> None:
    assert parse(VLLM, 1.0).running == 55.0


def test_an_unlabelled_sample_counts_for_the_model() -> None:
    text = "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 7\n"
    assert parse(text, 0.0, "m").running == 7.0


@pytest.mark.parametrize("text", [
    "<html>not { prometheus } at all\x00",
    'vllm:num_requests_running{model_name="m" 3',
    "vllm:num_requests_running{model_name=\"m\"} three",
])
def test_garbage_is_an_unknown_scrape(text: str) -> None:
    assert parse(text, 2.0, "m") == Scrape(2.0)


def test_a_server_without_vllm_families_is_unknown() -> None:
    s = parse("# TYPE up gauge\nup 1\n", 0.0, "m")
    assert not s.known


def test_non_finite_and_negative_samples_are_not_load() -> None:
    """NaN kv usage went out as JSON null in the heartbeat (undecodable) and +Inf running
    made stats() raise: such samples are dropped, the others kept."""
    text = ("# TYPE vllm:num_requests_running gauge\n"
            'vllm:num_requests_running{engine="0",model_name="m"} +Inf\n'
            'vllm:num_requests_running{engine="1",model_name="m"} 2\n'
            "# TYPE vllm:num_requests_waiting gauge\n"
            'vllm:num_requests_waiting{model_name="m"} -4\n'
            "# TYPE vllm:kv_cache_usage_perc gauge\n"
            'vllm:kv_cache_usage_perc{model_name="m"} NaN\n')
    s = parse(text, 0.0, "m")
    assert (s.running, s.waiting, s.kv_usage, s.known) == (2.0, 0.0, 0.0, True)
    load = ServerLoad()
    load.add(s)
    assert load.stats(held=1) == EngineStats(running=2, waiting=0, kv_usage=0.0)


def test_kv_usage_is_clamped_to_one() -> None:
    text = "# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc 1.7\n"
    assert parse(text, 0.0).kv_usage == 1.0


# -- ServerLoad ------------------------------------------------------------------------
def at(t: float, **kw: float) -> Scrape:
    return Scrape(t, known=True, **kw)


def test_no_scrape_or_an_unknown_one_reports_what_is_held() -> None:
    load = ServerLoad()
    assert load.stats(held=3) == EngineStats(running=3)
    load.add(Scrape(1.0))
    assert load.stats(held=2) == EngineStats(running=2)


def test_running_is_never_below_what_is_held() -> None:
    load = ServerLoad()
    load.add(at(0.0, running=1.0, waiting=2.0, kv_usage=0.3))
    assert load.stats(held=4) == EngineStats(running=4, waiting=2, kv_usage=0.3)
    assert load.stats(held=0).running == 1


def test_rates_and_hit_rate_between_the_first_and_last_scrape() -> None:
    load = ServerLoad(window_s=10.0)
    load.add(at(0.0, queries=100.0, hits=10.0, prompt=1000.0, gen=50.0))
    load.add(at(2.0, queries=300.0, hits=110.0, prompt=5000.0, gen=250.0))
    st = load.stats(held=0)
    assert st.prefix_hit_rate == 0.5
    assert st.prompt_tokens_per_s == 2000.0 and st.gen_tokens_per_s == 100.0


def test_one_scrape_has_no_rates() -> None:
    load = ServerLoad()
    load.add(at(5.0, queries=100.0, hits=50.0, prompt=1000.0, gen=10.0))
    st = load.stats(held=0)
    assert (st.prefix_hit_rate, st.prompt_tokens_per_s, st.gen_tokens_per_s) == (0.0, 0.0, 0.0)


def test_old_scrapes_leave_the_window() -> None:
    load = ServerLoad(window_s=10.0)
    for t in range(0, 31, 5):
        load.add(at(float(t), gen=float(t * 100)))
    assert load.last is not None and load.last.at == 30.0
    st = load.stats(held=0)
    assert st.gen_tokens_per_s == 100.0  # (3000 - 2000) / 10 s: the first kept is t=20
    assert len(load._scrapes) == 3


def test_counters_that_went_back_give_no_negative_rates() -> None:
    """A restarted server starts its counters at zero again."""
    load = ServerLoad()
    load.add(at(0.0, queries=1000.0, hits=900.0, prompt=9000.0, gen=900.0))
    load.add(at(1.0, queries=1100.0, hits=10.0, prompt=10.0, gen=10.0))
    st = load.stats(held=0)
    assert st.prompt_tokens_per_s == 0.0 and st.gen_tokens_per_s == 0.0
    assert 0.0 <= st.prefix_hit_rate <= 1.0


# -- the splitter: bytes as the socket gives them ---------------------------------------
def test_any_split_of_a_body_gives_the_same_events() -> None:
    from cplane.workers.engines.remote.sse import SseSplitter

    body = (b'data: {"a": 1}\n\n: ping\n\ndata: {"b":\ndata: 2}\r\n\r\n'
            b'data: {"c": [3]}\n\ndata: [DONE]\n\n')
    want = [{"a": 1}, {"b": 2}, {"c": [3]}]
    for i in range(len(body) + 1):
        for j in range(i, len(body) + 1):
            sp = SseSplitter()
            got = [*sp.feed(body[:i]), *sp.feed(body[i:j]), *sp.feed(body[j:])]
            sp.end()
            assert got == want and sp.done, (i, j)


def test_what_one_read_brings_is_one_batch_and_a_fault_waits_its_turn() -> None:
    from cplane.workers.engines.remote.sse import ServerProtocolError, SseSplitter

    sp = SseSplitter()
    assert sp.feed(b'data: {"a": 1}\n\ndata: {"b": 2}\n\ndata: {oops\n\n') == [{"a": 1},
                                                                               {"b": 2}]
    with pytest.raises(ServerProtocolError, match="malformed"):
        sp.check()
