"""Remote engines: real `vllm serve` processes (CPU, the tiny model) fronted by
cplane workers over HTTP, behind a real nats-server and orchestrator.

Greedy outputs are compared with the same server asked directly, so "served
through cplane" means the very tokens vLLM makes, continued exactly after a
move (kill -9 of a server mid-stream, a prefill's hand-off to a decode).
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path
from typing import Any

import nats

from cplane.client.control import ControlPlane
from cplane.client.sdk import Client
from cplane.schemas.messages import ChatMessage, FinishReason, Request, Role, WorkerState
from tests.natsfix import isolated_settings
from tests.remote.conftest import fronting, serving, spec
from tests.stack import stack
from tests.vllm_model import MODEL_NAME
from tests.vllm_serve import VllmServer
from tests.waiting import until

PROMPT = "The quick brown fox jumps over the lazy dog near the river bank"


def direct_ids(server: VllmServer, prompt: str, n: int) -> list[int]:
    """Greedy token ids from the server itself (no cplane in between)."""
    body = json.dumps({"model": MODEL_NAME, "prompt": prompt, "max_tokens": n,
                       "temperature": 0.0, "ignore_eos": True, "return_token_ids": True})
    req = urllib.request.Request(f"{server.url}/v1/completions", data=body.encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return list(json.load(resp)["choices"][0]["token_ids"])


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return str(resp.read().decode())


def greedy(rid: str, prompt: str = PROMPT, n: int = 24, **kw: Any) -> Request:
    return Request(request_id=rid, prompt=prompt, max_tokens=n, temperature=0.0,
                   ignore_eos=True, model=MODEL_NAME, **kw)


async def served(client: Client, req: Request) -> tuple[list[int], Any]:
    handle = await client.submit(req)
    chunks = [c async for c in handle]
    return [t for c in chunks for t in c.token_ids], await handle.result(timeout=120)


async def test_remote_instance_serves_the_tokens_vllm_makes(
        nats_url: str, vllm_servers: list[VllmServer], vllm_model_dir: Path) -> None:
    a = vllm_servers[0]
    s = isolated_settings(nats_url)
    async with stack(s, workers=0), fronting(s, [spec(a, "ra", vllm_model_dir)]) as sup:
        client = Client(await nats.connect(nats_url), s)
        try:
            ids, final = await served(client, greedy("r1"))
            assert ids == direct_ids(a, PROMPT, 24)
            assert final.finish_reason is FinishReason.LENGTH and final.workers == ["ra"]
            assert final.usage.prompt_tokens > 0 and final.usage.completion_tokens == 24
            chat = Request(request_id="r2", messages=[ChatMessage(role="user", content="hi")],
                           max_tokens=6, temperature=0.0, model=MODEL_NAME)
            ids, final = await served(client, chat)
            assert len(ids) == final.usage.completion_tokens > 0
            engine = sup.fronts["ra"].engine
            assert engine is not None
            opened, sent = engine.pool_stats()
            assert sent >= 2 and opened < sent, (opened, sent)  # connections are reused
        finally:
            await client.close()


async def test_cancel_closes_the_stream_and_the_server_aborts(
        nats_url: str, vllm_servers: list[VllmServer], vllm_model_dir: Path) -> None:
    a = vllm_servers[0]
    s = isolated_settings(nats_url)
    async with stack(s, workers=0), fronting(s, [spec(a, "rc", vllm_model_dir)]):
        client = Client(await nats.connect(nats_url), s)
        try:
            handle = await client.submit(Request(
                request_id="rc1", prompt="x", max_tokens=480, temperature=1.0, seed=1,
                ignore_eos=True, model=MODEL_NAME))
            stream = handle.__aiter__()
            await asyncio.wait_for(stream.__anext__(), 60)  # it runs on the server now
            assert a.metric("vllm:num_requests_running") >= 1
            await handle.cancel()
            final = await handle.result(timeout=60)
            assert final.finish_reason is FinishReason.CANCELLED
            assert final.usage.completion_tokens < 480
            await until(lambda: a.metric("vllm:num_requests_running") == 0, 30,
                        "vLLM's running count back to 0 (the request aborted)")
        finally:
            await client.close()


async def test_server_killed_mid_stream_continues_on_another_instance(
        nats_url: str, vllm_servers: list[VllmServer], vllm_model_dir: Path) -> None:
    """kill -9 the server generating a request: the worker hands it back with its
    stored tokens, another instance continues after them, and the whole greedy
    output equals an uninterrupted run."""
    a = vllm_servers[0]
    doomed = VllmServer(vllm_model_dir, "doomed").start()
    await asyncio.to_thread(doomed.wait_ready)
    s = isolated_settings(nats_url, worker={"chunk_tokens": 1})
    n = 200
    try:
        async with stack(s, workers=0), fronting(s, [spec(doomed, "rk", vllm_model_dir)]):
            client = Client(await nats.connect(nats_url), s)
            try:
                handle = await client.submit(greedy("rk1", n=n))
                stream = handle.__aiter__()
                seen = 0
                while seen < 8:  # a few tokens stored, from the doomed server
                    chunk = await asyncio.wait_for(stream.__anext__(), 60)
                    seen += len(chunk.token_ids)
                async with fronting(s, [spec(a, "rk-b", vllm_model_dir)]):
                    doomed.kill()
                    final = await handle.result(timeout=120)
                assert final.workers[0] == "rk" and final.workers[-1] == "rk-b", final.workers
                assert final.usage.completion_tokens == n
            finally:
                await client.close()
        stored = await _stored_ids(nats_url, s, "rk1")
        assert stored == direct_ids(a, PROMPT, n)
    finally:
        doomed.stop()


async def _stored_ids(nats_url: str, s: Any, rid: str) -> list[int]:
    """The request's token ids as stored in LLM_OUT (every chunk, in seq order)."""
    from cplane.bus.replay import streamed_chunks
    from cplane.schemas.subjects import INTERACTIVE_GROUP

    nc = await nats.connect(nats_url)
    try:
        chunks = await streamed_chunks(nc.jetstream(), s, INTERACTIVE_GROUP, rid)
        return [t for c in chunks for t in c.token_ids]
    finally:
        await nc.close()


async def test_instances_added_and_removed_under_load(
        nats_url: str, vllm_servers: list[VllmServer], vllm_model_dir: Path) -> None:
    """Instances come and go through the KV bucket while requests run: every request
    ends with one Final, the new instance takes work, the removed one drains."""
    a, b = vllm_servers
    s = isolated_settings(nats_url, metrics={"worker_port": -1})
    async with stack(s, workers=0), ControlPlane(await nats.connect(nats_url), s) as cp:
        await cp.register_instance(spec(a, "ga", vllm_model_dir, group="g1"))
        async with fronting(s, [], group="g1", wait_for=["ga"]) as sup:
            client = Client(await nats.connect(nats_url), s)
            try:
                first = [asyncio.create_task(served(client, greedy(f"ld{i}", n=48)))
                         for i in range(6)]
                await cp.register_instance(spec(b, "gb", vllm_model_dir, group="g1"))
                await until(lambda: serving(sup, ["gb"]), 60, "gb fronted")
                assert [x.instance_id for x in await cp.list_instances()] == ["ga", "gb"]
                page = await asyncio.to_thread(_get, f"http://127.0.0.1:{sup.metrics_port}/metrics")
                assert 'cplane_worker_healthy{worker="ga"} 1.0' in page
                assert 'cplane_worker_healthy{worker="gb"} 1.0' in page
                second = [asyncio.create_task(served(client, greedy(f"le{i}", n=48)))
                          for i in range(6)]
                ga_worker = sup.fronts["ga"].worker
                assert ga_worker is not None
                await until(lambda: ga_worker.held_items > 0, 60, "ga holds requests")
                await cp.unregister_instance("ga")  # drains while requests run on it
                results = await asyncio.gather(*first, *second)
                assert all(f.usage.completion_tokens == 48 for _, f in results)
                served_by = {w for _, f in results for w in f.workers}
                assert served_by == {"ga", "gb"}, served_by
                await until(lambda: ga_worker.state is WorkerState.STOPPED, 60, "ga drained")
                listed = [x.instance_id for x in await cp.list_instances()]
                assert listed == ["gb"], (listed, await _bucket_state(cp))
            finally:
                await client.close()


async def _bucket_state(cp: ControlPlane) -> dict[str, Any]:
    """What the config bucket holds, raw (a CI run once listed no instance at all)."""
    js, bucket = cp.nc.jetstream(), cp.settings.subjects.config_bucket
    info = await js.stream_info(f"KV_{bucket}", subjects_filter=f"$KV.{bucket}.>")
    kv = await js.key_value(bucket)
    out: dict[str, Any] = {"subjects": info.state.subjects, "messages": info.state.messages}
    for key in ("instance.ga", "instance.gb"):
        try:
            entry = await kv.get(key)
            out[key] = (entry.operation, entry.revision, (entry.value or b"")[:80])
        except Exception as exc:  # the failure itself is what we want to see
            out[key] = repr(exc)
    return out


async def test_mixed_fleet_in_process_remote_and_sim(
        nats_url: str, vllm_servers: list[VllmServer], vllm_model_dir: Path,
        vllm_engine: Any) -> None:
    """One in-process vLLM worker, two remote instances and sim workers, routed by the
    same policy and router: tiny-llama requests spread over the three vLLM engines
    (same greedy tokens wherever they run), sim requests go to the sim workers."""
    a, b = vllm_servers
    s = isolated_settings(nats_url, orchestrator={"router": "least_loaded"})
    workers = [{"engine": vllm_engine, "worker_id": "inproc", "model": MODEL_NAME,
                "capacity": 2},
               {"worker_id": "sim0", "model": "sim"}, {"worker_id": "sim1", "model": "sim"}]
    async with stack(s, workers=workers), fronting(
            s, [spec(a, "ma", vllm_model_dir, capacity=2),
                spec(b, "mb", vllm_model_dir, capacity=2)]):
        client = Client(await nats.connect(nats_url), s)
        try:
            expected = direct_ids(a, PROMPT, 16)
            vllm_reqs = [served(client, greedy(f"mx{i}", n=16)) for i in range(9)]
            sim_reqs = [served(client, Request(request_id=f"ms{i}", prompt="hello sim",
                                               max_tokens=8, model="sim")) for i in range(4)]
            results = await asyncio.gather(*vllm_reqs, *sim_reqs)
            for ids, _ in results[:9]:
                assert ids == expected
            assert {f.workers[0] for _, f in results[:9]} == {"inproc", "ma", "mb"}
            assert {f.workers[0] for _, f in results[9:]} <= {"sim0", "sim1"}
        finally:
            await client.close()


async def test_pd_over_http_prefill_and_decode_instances(
        nats_url: str, vllm_servers: list[VllmServer], vllm_model_dir: Path) -> None:
    """A prefill instance and a decode instance (vLLM's kv_transfer_params protocol,
    ExampleConnector on both servers): the greedy output equals the unified one, and
    the decode side reports the prompt's KV as cached (it moved, not recomputed)."""
    a, b = vllm_servers
    s = isolated_settings(nats_url, orchestrator={"pd_mode": "always"})
    prompt = PROMPT + " and keeps running until the sun goes down over the hills again"
    async with stack(s, workers=0) as run, fronting(
            s, [spec(a, "pa", vllm_model_dir, role=Role.PREFILL),
                spec(b, "db", vllm_model_dir, role=Role.DECODE)]):
        client = Client(await nats.connect(nats_url), s)
        try:
            ids, final = await served(client, greedy("pd1", prompt=prompt, n=16))
            assert final.workers == ["pa", "db"], final.workers
            assert ids == direct_ids(a, prompt, 16)
            assert final.usage.cached_prompt_tokens > 0, "the decode recomputed the prompt"
            assert run.orchestrator is not None and run.orchestrator.counters["pd"] >= 1
        finally:
            await client.close()


async def test_prefix_aware_router_follows_the_remote_servers_kv_events(
        nats_url: str, vllm_servers: list[VllmServer], vllm_model_dir: Path) -> None:
    """The orchestrator never sent these prefixes anywhere: a server caches them when
    asked directly, its KV events reach the router through the remote worker, and a
    request sharing the prefix goes to that server (which reports the cache hit)."""
    a, b = vllm_servers
    s = isolated_settings(
        nats_url, worker={"kv_events_ms": 10.0},
        orchestrator={"router": "prefix_aware", "policy": "fifo",
                      "prefix_tokenizer": str(vllm_model_dir), "prefix_block_tokens": 32})
    texts = {"ka": " ".join(f"apple{i % 7}x{i}" for i in range(40)),
             "kb": " ".join(f"banana{i % 7}x{i}" for i in range(40))}
    servers = {"ka": a, "kb": b}
    async with stack(s, workers=0) as run, fronting(
            s, [spec(a, "ka", vllm_model_dir), spec(b, "kb", vllm_model_dir)]):
        orch = run.orchestrator
        assert orch is not None
        await until(lambda: orch.registry.knows("ka") and orch.registry.knows("kb"), 30)
        for wid, text in texts.items():
            direct_ids(servers[wid], text, 1)  # cached there, behind cplane's back
        hasher, index = orch._hasher, orch.core.state.prefix
        assert hasher is not None
        blocks = {w: hasher.blocks(Request(request_id="x", prompt=t, model=MODEL_NAME))
                  for w, t in texts.items()}
        assert all(len(b) >= 2 for b in blocks.values())
        await until(lambda: all(index.match(w, blocks[w]) == len(blocks[w]) for w in texts),
                    30, "the servers' cached blocks in the router's index")
        client = Client(await nats.connect(nats_url), s)
        try:
            for wid, text in texts.items():
                before = servers[wid].metric("vllm:prefix_cache_hits_total")
                for i in range(2):
                    _, final = await served(client, greedy(f"kp-{wid}-{i}",
                                                           prompt=text + f" more {i}", n=2))
                    assert final.workers == [wid], (wid, final.workers)
                assert servers[wid].metric("vllm:prefix_cache_hits_total") - before >= 64
        finally:
            await client.close()


async def test_a_paused_server_is_taken_out_and_back_without_waiting_for_its_stall(
        nats_url: str, vllm_servers: list[VllmServer], vllm_model_dir: Path) -> None:
    """SIGSTOP the server generating a request (slow, not dead): its probes fail, the
    instance goes unhealthy and hands the request back long before the stall timeout,
    another instance finishes it with the same greedy tokens; after SIGCONT a fresh
    worker takes the instance's identity and it serves again."""
    import os
    import signal

    a, b = vllm_servers
    s = isolated_settings(nats_url, worker={"chunk_tokens": 1})
    n = 200
    assert b.proc is not None
    async with stack(s, workers=0), fronting(s, [spec(b, "pb", vllm_model_dir)]) as sup:
        client = Client(await nats.connect(nats_url), s)
        try:
            handle = await client.submit(greedy("ps1", n=n))
            stream = handle.__aiter__()
            seen = 0
            while seen < 8:
                seen += len((await asyncio.wait_for(stream.__anext__(), 60)).token_ids)
            async with fronting(s, [spec(a, "pa2", vllm_model_dir)]):
                os.killpg(b.proc.pid, signal.SIGSTOP)
                try:
                    final = await handle.result(timeout=20)  # well under the 30 s stall
                    front = sup.fronts["pb"]
                    assert front.worker is None or front.worker.state is not WorkerState.READY
                finally:
                    os.killpg(b.proc.pid, signal.SIGCONT)
            assert final.workers[0] == "pb" and final.workers[-1] == "pa2", final.workers
            assert await _stored_ids(nats_url, s, "ps1") == direct_ids(a, PROMPT, n)
            await until(lambda: serving(sup, ["pb"]), 60, "pb back after SIGCONT")
            _, again = await served(client, greedy("ps2", n=4))
            assert again.workers == ["pb"]
        finally:
            await client.close()
