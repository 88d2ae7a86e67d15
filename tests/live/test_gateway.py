"""`cplane gateway` as a process on a real nats-server, with an orchestrator and sim workers,
driven by clients no one here wrote: the openai SDK and raw HTTP (httpx)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator

import httpx
import nats
import pytest
from nats.aio.msg import Msg
from openai import AsyncOpenAI, BadRequestError, NotFoundError, RateLimitError

from cplane.bus.provision import ensure_streams
from cplane.bus.server import EmbeddedNats
from cplane.client.sdk import Client
from cplane.gateway import sse
from cplane.schemas.messages import Final, FinishReason
from cplane.schemas.settings import Settings
from tests.natsfix import isolated_settings
from tests.stack import stack
from tests.waiting import until

# A class whose TTFT target nothing can meet: the orchestrator sheds it at once.
INSTANT = {"ttft_ms": 0.001, "tpot_ms": 1.0, "sheddable": True}
CHAT = [{"role": "user", "content": "hello there"}]


def _env(s: Settings, **extra: str) -> dict[str, str]:
    """The gateway process sees the test's private prefix and stream names."""
    env = dict(os.environ, CPLANE__NATS__PREFIX=s.nats.prefix, CPLANE_LOG_LEVEL="WARNING", **extra)
    for key in ("req", "work", "out", "done", "cancel", "dlq"):
        env[f"CPLANE__STREAMS__{key.upper()}__NAME"] = getattr(s.streams, key).name
    return env


@contextlib.asynccontextmanager
async def gateway(s: Settings, *args: str, workers: int = 1, **env: str) -> AsyncIterator[str]:
    """`cplane gateway` on a free port; yields its URL once /health sees `workers` workers."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cplane.cli", "gateway", "--nats-url", s.nats.url, "--port", "0",
        *args, stdout=asyncio.subprocess.PIPE, env=_env(s, **env))
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        assert line.startswith("gateway: http://127.0.0.1:"), line
        url = line.split()[1]
        async with httpx.AsyncClient(base_url=url) as http:
            async def ready() -> bool:
                with contextlib.suppress(httpx.HTTPError):
                    r = await http.get("/health")
                    return r.status_code == 200 and r.json()["workers"] >= workers
                return False

            await until(ready, 30, "the gateway's /health")
        yield url
    finally:
        if proc.returncode is None:
            proc.terminate()
        rc = await asyncio.wait_for(proc.wait(), 30)
    assert rc == 0, f"the gateway exited with {rc}"


def _sdk(url: str, key: str = "none") -> AsyncOpenAI:
    return AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def settings(nats_url: str) -> Settings:
    return isolated_settings(
        nats_url, orchestrator={"slo_classes": {
            "standard": {"ttft_ms": 1000.0, "tpot_ms": 100.0},
            "interactive": {"ttft_ms": 250.0, "tpot_ms": 100.0, "sheddable": True},
            "instant": INSTANT}},
        worker={"price_in_per_1k": 1.0, "price_out_per_1k": 1.0})


@pytest.fixture(scope="module")
async def up(settings: Settings) -> AsyncIterator[str]:
    """Orchestrator + two sim workers in-process, the gateway as a process."""
    async with stack(settings, workers=2), gateway(settings, workers=2) as url:
        yield url


async def test_openai_sdk_round_trip_plain_and_streaming(up: str) -> None:
    sdk = _sdk(up)
    models = [m.id for m in (await sdk.models.list()).data]
    assert models == ["sim"]

    r = await sdk.chat.completions.create(model="sim", messages=CHAT, max_tokens=8)  # type: ignore[arg-type]
    assert r.object == "chat.completion" and r.model == "sim"
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "length"
    assert len((r.choices[0].message.content or "").split()) == 8  # the sim: one word a token
    assert r.usage is not None and r.usage.completion_tokens == 8 and r.usage.prompt_tokens > 0

    stream = await sdk.chat.completions.create(
        model="sim", messages=CHAT, max_tokens=12, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True})
    parts, reasons, usage = [], [], None
    async for ch in stream:
        if ch.choices:
            parts.append(ch.choices[0].delta.content or "")
            reasons.append(ch.choices[0].finish_reason)
        else:
            usage = ch.usage
    assert len("".join(parts).split()) == 12
    assert reasons[-1] == "length" and all(x is None for x in reasons[:-1])
    assert usage is not None and usage.completion_tokens == 12

    c = await sdk.completions.create(model="sim", prompt="once upon", max_tokens=5, seed=1,
                                     temperature=0, stop=["never"])
    assert c.object == "text_completion" and len(c.choices[0].text.split()) == 5
    texts = [ch.choices[0].text async for ch in await sdk.completions.create(
        model="sim", prompt="once upon", max_tokens=5, stream=True) if ch.choices]
    assert len("".join(texts).split()) == 5


async def test_sse_framing_data_lines_and_done(up: str) -> None:
    async with httpx.AsyncClient(base_url=up, timeout=30) as http:
        for include_usage in (True, False):
            body: dict[str, object] = {"model": "sim", "prompt": "x", "max_tokens": 6,
                                       "stream": True}
            if include_usage:
                body["stream_options"] = {"include_usage": True}
            r = await http.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            assert r.headers["content-type"].startswith("text/event-stream")
            assert r.headers["x-request-id"]
            raw = r.content
            blocks = raw.decode().split("\n\n")
            assert blocks[-1] == "" and blocks[-2] == "data: [DONE]"
            assert all(b.startswith("data: ") and "\n" not in b for b in blocks[:-1])
            events = [json.loads(p) for p in sse.parse(raw)[:-1]]
            assert {e["id"] for e in events} == {"cmpl-" + r.headers["x-request-id"]}
            text = [e for e in events if e["choices"]]
            assert "".join(e["choices"][0]["text"] for e in text).count(" ") == 6
            assert text[-1]["choices"][0]["finish_reason"] == "length"
            if include_usage:
                assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 6
                assert all(e["usage"] is None for e in events[:-1])
            else:
                assert all("usage" not in e for e in events)


async def test_bad_input_gets_openai_shaped_4xx(up: str) -> None:
    async with httpx.AsyncClient(base_url=up, timeout=30) as http:
        cases: list[tuple[str, object, int, str | None]] = [
            ("/v1/chat/completions", b"{nope", 400, None),
            ("/v1/chat/completions", {"model": "sim"}, 400, "messages"),
            ("/v1/chat/completions", {"messages": CHAT, "n": 3}, 400, "n"),
            ("/v1/chat/completions", {"messages": CHAT, "max_tokens": "many"}, 400, "max_tokens"),
            ("/v1/chat/completions", {"messages": CHAT, "priority": "urgent"}, 400, "priority"),
            ("/v1/completions", {"prompt": {"a": 1}}, 400, "prompt"),
            ("/v1/completions", {"model": "gpt-9", "prompt": "x"}, 404, "model"),
            # Refused by the orchestrator (ErrorReply too_large), mapped by the gateway.
            ("/v1/completions", {"prompt": "x", "max_tokens": 10**7}, 400, None),
            # Over its cost budget at the workers' prices (ErrorReply over_budget).
            ("/v1/completions", {"prompt": "x", "max_tokens": 50, "cost_budget": 1e-9}, 402, None),
        ]
        for path, body, status, param in cases:
            kw = {"content": body} if isinstance(body, bytes) else {"json": body}
            r = await http.post(path, **kw)  # type: ignore[arg-type]
            assert r.status_code == status, (body, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"], r.text
            assert err["param"] == param, (body, err)
        r = await http.post("/v1/completions", json={"prompt": "x", "max_tokens": 10**7,
                                                    "stream": True})
        assert r.status_code == 400 and r.json()["error"]["code"] == "too_large"
        r = await http.get("/v1/nothing")
        assert r.status_code == 404 and r.json()["error"]["message"]
    sdk = _sdk(up)
    with pytest.raises(BadRequestError):
        await sdk.chat.completions.create(model="sim", messages=[], max_tokens=2)
    with pytest.raises(NotFoundError):
        await sdk.chat.completions.create(model="gpt-9", messages=CHAT, max_tokens=2)  # type: ignore[arg-type]


async def test_shed_request_gets_429_with_retry_after(up: str) -> None:
    sdk = _sdk(up)
    for stream in (False, True):
        with pytest.raises(RateLimitError) as info:
            await sdk.chat.completions.create(model="sim", messages=CHAT, max_tokens=4,  # type: ignore[call-overload]
                                              stream=stream, extra_headers={"x-slo-class": "instant"})
        assert int(info.value.response.headers["retry-after"]) >= 1
        assert info.value.body["code"] == "overloaded"  # type: ignore[index]
    async with httpx.AsyncClient(base_url=up) as http:
        metrics = (await http.get("/metrics")).text
    assert 'cplane_gateway_requests_total{endpoint="/v1/chat/completions",status="429"} 2.0' in metrics
    assert "cplane_gateway_overloaded_total 2.0" in metrics
    assert "cplane_gateway_outputs_recovered_total" in metrics  # the client's QuietWatch


async def _cancelled(s: Settings, request_id: str) -> Final:
    client = await Client.connect(s.nats.url, s)
    try:
        handle = await client.attach(request_id)
        final = await handle.result(30)
    finally:
        await client.close()
    return final


async def test_client_that_disconnects_cancels_its_request(up: str, settings: Settings) -> None:
    s = settings
    nc = await nats.connect(s.nats.url)
    cancels: list[str] = []

    async def on_cancel(msg: Msg) -> None:
        cancels.append(msg.subject.rpartition(".")[2])

    sub = await nc.subscribe(s.subjects.cancel("*"), cb=on_cancel)
    try:
        # Streaming: read the first event, then hang up. 4000 sim tokens take ~30 s.
        body = {"model": "sim", "prompt": "x", "max_tokens": 4000, "stream": True}
        async with httpx.AsyncClient(base_url=up, timeout=30) as http:
            async with http.stream("POST", "/v1/completions", json=body) as r:
                rid = r.headers["x-request-id"]
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        break
        final = await _cancelled(s, rid)
        assert final.finish_reason is FinishReason.CANCELLED
        assert final.usage.completion_tokens < 4000
        # Not streaming: the client gives up before any byte came back.
        async with httpx.AsyncClient(base_url=up, timeout=1.0) as http:
            with pytest.raises(httpx.ReadTimeout):
                await http.post("/v1/completions", json={**body, "stream": False})
        await until(lambda: len(cancels) >= 2, 15, "a cancel from the gateway")
        final = await _cancelled(s, cancels[-1])
        assert final.finish_reason is FinishReason.CANCELLED
    finally:
        await sub.unsubscribe()
        await nc.close()
    async with httpx.AsyncClient(base_url=up) as http:
        metrics = (await http.get("/metrics")).text
    assert "cplane_gateway_client_cancels_total 2.0" in metrics
    assert "cplane_gateway_open_streams 0.0" in metrics


async def test_full_request_stream_gets_429_and_keys_name_tenants(nats_url: str) -> None:
    """No orchestrator and room for one request: the next publish is refused -> 429."""
    s = isolated_settings(nats_url, stream_req={"max_msgs": 1})
    nc = await nats.connect(nats_url)
    try:
        await ensure_streams(nc.jetstream(), s)
        async with gateway(s, "--api-key", "k1=acme", workers=0) as url:
            async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                r = await http.post("/v1/completions", json={"prompt": "x"})
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
                assert (await http.get("/v1/models")).status_code == 401
                assert (await http.get("/v1/batches")).status_code == 401
                assert (await http.get("/health")).status_code == 200  # probes need no key
                auth = {"authorization": "Bearer k1"}
                first = asyncio.create_task(http.post(
                    "/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=auth))
                js = nc.jetstream()

                async def stored() -> bool:
                    return (await js.stream_info(s.streams.req.name)).state.messages == 1

                await until(stored, 15, "the first request stored")
                # a key's tenant is in the subject (what the orchestrator trusts)
                msg = await js.get_last_msg(s.streams.req.name,
                                            s.subjects.request("normal", tenant="acme"))
                assert json.loads(msg.data or b"{}")["tenant"] == "acme"
                r = await http.post("/v1/chat/completions", headers=auth,
                                    json={"messages": CHAT, "stream": True})
                assert r.status_code == 429, r.text
                assert int(r.headers["retry-after"]) >= 1
                assert r.json()["error"]["type"] == "rate_limit_error"
                first.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await first
    finally:
        await nc.close()


async def test_files_and_batches_through_the_openai_sdk(up: str) -> None:
    """An OpenAI batch: upload the JSONL, create the batch, wait, read the output file."""
    sdk = _sdk(up)
    lines = [{"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "sim", "messages": CHAT, "max_tokens": 3 + i}} for i in range(5)]
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    f = await sdk.files.create(file=("in.jsonl", data), purpose="batch")
    assert f.bytes == len(data) and f.filename == "in.jsonl" and f.purpose == "batch"
    assert (await sdk.files.retrieve(f.id)).id == f.id
    assert (await sdk.files.content(f.id)).content == data
    b = await sdk.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                 completion_window="24h", metadata={"who": "test"})
    assert b.status in ("validating", "in_progress") and b.input_file_id == f.id

    async def finished() -> bool:
        nonlocal b
        b = await sdk.batches.retrieve(b.id)
        return b.status == "completed" and b.output_file_id is not None
    await until(finished, 60, "the batch to complete")
    assert b.request_counts is not None and b.request_counts.completed == 5
    assert b.metadata == {"who": "test"} and b.endpoint == "/v1/chat/completions"
    out = [json.loads(x) for x in (await sdk.files.content(b.output_file_id or "")).text.splitlines()]
    assert sorted(o["custom_id"] for o in out) == [f"q{i}" for i in range(5)]
    for o in out:
        n = 3 + int(o["custom_id"][1:])
        assert o["response"]["status_code"] == 200
        assert o["response"]["body"]["usage"]["completion_tokens"] == n
    assert b.id in [x.id async for x in sdk.batches.list()]
    # Bad input: an unknown file is 404, a file with a bad line is 400 naming the line.
    with pytest.raises(NotFoundError):
        await sdk.batches.create(input_file_id="file-nope", endpoint="/v1/completions",
                                 completion_window="24h")
    bad = await sdk.files.create(file=("bad.jsonl", data + b"{oops\n"), purpose="batch")
    with pytest.raises(BadRequestError) as info:
        await sdk.batches.create(input_file_id=bad.id, endpoint="/v1/chat/completions",
                                 completion_window="24h")
    assert "line 6" in str(info.value.message)
    with pytest.raises(NotFoundError):
        await sdk.batches.retrieve("batch_nope")


async def test_broker_down_is_503_with_retry_after_and_health_follows() -> None:
    """A private nats-server goes away: publishes get 503 + Retry-After, /health 503; back: 200."""
    server = EmbeddedNats().start()
    try:
        s = isolated_settings(server.url)
        nc = await nats.connect(server.url)
        await ensure_streams(nc.jetstream(), s)
        await nc.close()
        async with gateway(s, workers=0) as url, httpx.AsyncClient(base_url=url,
                                                                  timeout=60) as http:
            server.terminate()
            await until(lambda: _status(http, "/health", 503), 15, "/health to say 503")
            r = await http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
            assert r.status_code == 503, r.text
            assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["message"]
            server.restart()
            await until(lambda: _status(http, "/health", 200), 30, "/health to say 200 again")
    finally:
        server.stop()


async def _status(http: httpx.AsyncClient, path: str, want: int) -> bool:
    return (await http.get(path)).status_code == want
