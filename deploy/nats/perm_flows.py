"""check_permissions.py, continued: the flows added after it was written.

- the in-flight signal `llm.fin.<id>` (checked in check_flow), precise prefix
  routing (`llm.kv.<worker>`, snapshot requests on `llm.admin.kv.<worker>`),
  acted out on the wire here and by the real services in `check_operators`;
- batch jobs: the client creates and uses KV `llm_batches` and the object
  store `llm_batch_files` (bus/provision.py ensure_batch_stores, JobStore);
- with the real orchestrator and worker running (called by check_services):
  an operator (admin) using the control API (client/control.py), `cplane
  workers` (heartbeats + llm.admin.breakers); the client running a whole
  batch job and cancelling another, `cplane tail` (stored_results, ordered and
  durable), and the OpenAI gateway (/v1/models from heartbeats, a chat
  completion, /v1/files, /v1/batches) on the client user;
- the denials that go with them.
"""

from __future__ import annotations

import asyncio
import datetime
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import msgspec
import nats
from nats.aio.msg import Msg
from nats.js.api import KeyValueConfig, StreamConfig
from nats.js.errors import APIError
from perm_harness import Checks, Conn, denied, pub_denied, registered, sub_denied, until

from cplane.client.batch import SubmitOptions, cancel_job, start_job, validate_file
from cplane.client.batch_lines import LineChecker
from cplane.client.batch_run import PLACEHOLDER_JOB, run_batch
from cplane.client.batch_store import JobStore, input_object
from cplane.client.control import ControlPlane
from cplane.client.results import delete_durable, stored_results
from cplane.client.sdk import Client
from cplane.gateway.app import Gateway
from cplane.gateway.metrics import GatewayMetrics
from cplane.gateway.models import LiveModels
from cplane.orchestrator.service import Orchestrator
from cplane.schemas.batch import JobState
from cplane.schemas.codec import encode, kv_events_decoder
from cplane.schemas.control import RequestPhase
from cplane.schemas.messages import KvEvents
from cplane.schemas.settings import Settings
from cplane.workers.runtime import Worker
from cplane.workers_cmd import _breakers, collect


# -- precise prefix routing, on the wire ----------------------------------------------------
async def check_kv_wire(c: Checks, settings: Settings, orch: Conn, wrk: Conn) -> None:
    subj = settings.subjects
    (onc, oerr), (wnc, werr) = orch, wrk
    no, nw = len(oerr), len(werr)  # earlier sections' intended refusals
    events: list[str] = []

    async def on_events(msg: Msg) -> None:
        events.append(msg.subject)

    async def on_snapshot(msg: Msg) -> None:  # as workers/kv_events.py answers
        await wnc.publish(msg.reply, encode(KvEvents(worker_id="w1", epoch="e", seq=1,
                                                     block_tokens=4, stored=[7], cleared=True)))

    await onc.subscribe(subj.kv_events_all, cb=on_events)
    await wnc.subscribe(subj.kv_snapshot("w1"), cb=on_snapshot)
    await registered(onc, wnc)
    ev = KvEvents(worker_id="w1", epoch="e", seq=1, block_tokens=4, stored=[7])
    await wnc.publish(subj.kv_events("w1"), encode(ev))
    c.ok("worker publishes KV events, orchestrator follows llm.kv.*",
         await until(lambda: events == [subj.kv_events("w1")], 3),
         f"{events} {werr[nw:]} {oerr[no:]}")
    reply = await onc.request(subj.kv_snapshot("w1"), b"", timeout=2)
    c.ok("orchestrator asks a worker for a KV snapshot; it answers",
         kv_events_decoder.decode(reply.data).stored == [7] and not werr[nw:] and not oerr[no:],
         str(werr[nw:] + oerr[no:]))


# -- batch stores, as a client -----------------------------------------------------------
async def check_batch_stores(c: Checks, settings: Settings, adm: nats.NATS, cli: Conn) -> None:
    cnc, cerr = cli
    store = await JobStore.open(cnc.jetstream(), settings)  # creates both: none exist yet
    names = [si.config.name for si in await adm.jetstream().streams_info()]
    c.ok("client creates the batch KV bucket and object store",
         "KV_llm_batches" in names and "OBJ_llm_batch_files" in names and not cerr,
         f"{names} {cerr}")
    again = await JobStore.open(cnc.jetstream(), settings)  # exists: same config, a no-op
    c.ok("client opens the existing batch stores", again.kv._stream == "KV_llm_batches")
    await store.kv.create("job-x", b"{}")
    rev = (await store.kv.get("job-x")).revision
    await store.kv.update("job-x", b'{"a":1}', last=rev)
    c.ok("client creates, reads and updates a job record (CAS)",
         (await store.kv.get("job-x")).value == b'{"a":1}' and await store.kv.keys() == ["job-x"],
         str(cerr))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "in.jsonl"
        path.write_bytes(b'{"x": 1}\n' * 1000)
        await store.put_input("job-x", path)
        await store.put_input("job-x", path)  # over an existing name: purges the old chunks
        async with store.input_file("job-x") as back:
            same = back.read_bytes() == path.read_bytes()
    info = await store.obs.get_info(input_object("job-x"))
    listed = [i.name for i in await store.obs.list(ignore_deletes=True)]
    c.ok("client stores, replaces, lists and reads a file (object store)",
         same and info.size == 9000 and listed == [input_object("job-x")] and not cerr,
         f"{listed} {cerr}")


# -- what must be refused ------------------------------------------------------------------
async def check_new_denials(c: Checks, orch: Conn, wrk: Conn, cli: Conn) -> None:
    (wnc, werr), (cnc, cerr) = wrk, cli
    cjs = cnc.jetstream()
    await pub_denied(c, "client cannot publish llm.fin (free a slot early)", cli, "llm.fin.r1")
    await pub_denied(c, "client cannot publish llm.kv (forge cache events)", cli, "llm.kv.w1")
    await pub_denied(c, "client cannot publish heartbeats", cli, "llm.hb.w1")
    await sub_denied(c, "client cannot subscribe llm.kv.* (cached prompts' hashes)", cli,
                     "llm.kv.*")
    await denied(c, "client cannot ask a worker's KV snapshot",
                 cnc.request("llm.admin.kv.w1", b"", timeout=1), cerr)
    await denied(c, "client cannot ask the breakers", cnc.request("llm.admin.breakers", b"",
                                                                 timeout=1), cerr)
    await denied(c, "client cannot write the config KV",
                 cjs.publish("$KV.llm_config.policy", b"{}", timeout=1), cerr)
    await denied(c, "client cannot create the lease bucket",
                 cjs.create_key_value(KeyValueConfig(bucket="llm_leases")), cerr)
    await denied(c, "client cannot create another bucket",
                 cjs.create_key_value(KeyValueConfig(bucket="mine")), cerr)
    await denied(c, "client cannot delete the batch bucket",
                 cjs.delete_key_value("llm_batches"), cerr)
    await denied(c, "client cannot reconfigure the batch bucket",
                 cjs.update_stream(StreamConfig(name="KV_llm_batches",
                                                subjects=["$KV.llm_batches.>"])), cerr)
    await denied(c, "client cannot purge an output stream", cjs.purge_stream("LLM_OUT"), cerr)
    # Allowed by name, the create could capture any subjects; once the bucket
    # exists, the server refuses a create with another config.
    try:
        await cjs.add_stream(StreamConfig(name="KV_llm_batches", subjects=["llm.admin.>"]))
        refused = ""
    except APIError as exc:
        refused = str(exc)
    c.ok("client cannot re-create the existing batch bucket capturing other subjects",
         "already in use" in refused, refused)
    await sub_denied(c, "worker cannot answer llm.admin.breakers", wrk, "llm.admin.breakers")
    await sub_denied(c, "worker cannot answer llm.admin.status", wrk, "llm.admin.status")
    await sub_denied(c, "worker cannot answer llm.admin.instances", wrk, "llm.admin.instances")
    await sub_denied(c, "worker cannot answer llm.admin.policy", wrk, "llm.admin.policy")
    await sub_denied(c, "worker cannot follow other workers' KV events", wrk, "llm.kv.*")
    await denied(c, "worker cannot write a batch record",
                 wnc.jetstream().publish("$KV.llm_batches.job-x", b"{}", timeout=1), werr)
    await pub_denied(c, "orchestrator cannot forge KV events", orch, "llm.kv.w1")
    await sub_denied(c, "orchestrator no longer reads terminals live (llm.s.done.>)", orch,
                     "llm.s.done.>")


# -- operators, batch, tail and the gateway, against the running services ------------------
def _chat(cid: str) -> bytes:
    return msgspec.json.encode({"custom_id": cid, "method": "POST",
                                "url": "/v1/chat/completions",
                                "body": {"model": "sim", "max_tokens": 4,
                                         "messages": [{"role": "user", "content": cid}]}})


async def _first(it: AsyncIterator[object]) -> object:
    async for r in it:
        return r
    return None


async def check_operators(c: Checks, settings: Settings, port: int, orchestrator: Orchestrator,
                          worker: Worker, adm: Conn, cli: Conn, fins: list[str]) -> None:
    """Operator tools as user admin; the prefix feed and llm.fin as the services ran."""
    cp = ControlPlane(adm[0], settings, timeout_s=3)
    status = await cp.get_status()
    c.ok("admin: control status (every orchestrator answers)",
         status.leader == orchestrator.id and len(status.orchestrators) == 1, repr(status))
    m = await cp.get_metrics()
    c.ok("admin: control metrics (orchestrators and workers answer)",
         m.orchestrators == 1 and m.workers == 1, repr(m))
    ids = [hb.worker_id for hb in await cp.get_instances()]
    wr = await cp.get_instance_metrics(worker.worker_id)
    c.ok("admin: instances, and one worker's own report",
         ids == [worker.worker_id] and wr.worker_id == worker.worker_id, str(ids))
    rs = await cp.get_request_status("e2e-1")
    c.ok("admin: a request's status (from LLM_DONE)", rs.phase is RequestPhase.COMPLETED,
         repr(rs))
    states = await _breakers(adm[0], settings, 3)
    url = f"nats://admin:{'admin-pw'}@127.0.0.1:{port}"
    rows = await collect(msgspec.structs.replace(
        settings, nats=msgspec.structs.replace(settings.nats, url=url)), 1.5)
    c.ok("admin: `cplane workers` (heartbeats, the leader's breakers)",
         states is not None and [r.worker_id for r in rows] == [worker.worker_id], str(states))
    c.ok("workers and orchestrators signal stored terminals (llm.fin)",
         "e2e-1" in fins and "e2e-2" in fins, str(fins))
    feed = orchestrator._kv
    assert feed is not None
    c.ok("prefix router folds the worker's KV events",
         await until(lambda: feed.applied > 0, 5), f"applied={feed.applied} drop={feed.dropped}")
    await feed._resync(worker.worker_id)
    c.ok("prefix router gets a KV snapshot from the worker", feed.snapshots == 1,
         f"snapshots={feed.snapshots}")


async def check_client_tools(c: Checks, settings: Settings, client: Client,
                             models: LiveModels) -> None:
    """Batch jobs, `cplane tail` and the gateway, as user client."""
    nc, js = client.nc, client.nc.jetstream()
    with tempfile.TemporaryDirectory() as d:
        src, out, err = Path(d) / "in.jsonl", Path(d) / "out.jsonl", Path(d) / "err.jsonl"
        src.write_bytes(b"\n".join(_chat(f"q{i}") for i in range(3)) + b"\n")
        run = await run_batch(nc, settings, src, out, err)
        c.ok("client runs a batch job (store, publish, collect durably, write)",
             run.job.state is JobState.COMPLETED and run.written.ok == 3, repr(run.written))
        src2 = Path(d) / "in2.jsonl"
        src2.write_bytes(_chat("c0") + b"\n")
        store = await JobStore.open(js, settings)
        checked = validate_file(src2, LineChecker(PLACEHOLDER_JOB, limits=settings.limits))
        job, _ = await start_job(store, src2, checked, SubmitOptions(), nc.max_payload)
        job, sent = await cancel_job(nc, store, settings, job.id, wait_s=0.3)
        c.ok("client cancels a batch job", job.state is JobState.CANCELLING and sent == 1,
             f"{job.state} {sent}")

    since = datetime.timedelta(minutes=5)
    got = await asyncio.wait_for(_first(stored_results(js, settings, start=since, group="i")),
                                 5)
    dur = await asyncio.wait_for(_first(stored_results(js, settings, start=since,
                                                       durable="tail-check")), 5)
    c.ok("client: `cplane tail` (ordered and durable consumers on LLM_DONE)",
         got is not None and dur is not None and await delete_durable(js, settings,
                                                                      "tail-check"))

    gw = Gateway(settings, client, models, GatewayMetrics())
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=gw.app()), base_url="http://gw",
                             timeout=30)
    try:
        await until(lambda: bool(models.live()), 5)
        listed = (await http.get("/v1/models")).json()
        c.ok("gateway: /v1/models from heartbeats (llm.hb.*, llm.admin.heartbeat)",
             [x["id"] for x in listed["data"]] == ["sim"], str(listed))
        r = await http.post("/v1/chat/completions", json={
            "model": "sim", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
        c.ok("gateway: a chat completion", r.status_code == 200 and "choices" in r.json(),
             r.text[:200])
        up = await http.post("/v1/files", files={"file": ("b.jsonl", _chat("g0") + b"\n")},
                             data={"purpose": "batch"})
        fid = up.json().get("id", "")
        files = (await http.get("/v1/files")).json()["data"]
        info = await http.get(f"/v1/files/{fid}")
        content = await http.get(f"/v1/files/{fid}/content")
        c.ok("gateway: /v1/files upload, list, info, content (object store)",
             fid in [f["id"] for f in files] and info.status_code == 200
             and content.content == _chat("g0") + b"\n", f"{up.text[:200]} {files}")
        b = (await http.post("/v1/batches", json={
            "input_file_id": fid, "endpoint": "/v1/chat/completions",
            "completion_window": "24h"})).json()
        status = [b.get("status")]

        async def poll() -> bool:
            status[0] = (await http.get(f"/v1/batches/{b.get('id')}")).json().get("status")
            return status[0] == "completed"

        await until(poll, 10)
        c.ok("gateway: /v1/batches runs a job to completion", status[0] == "completed",
             f"{b} {status}")
    finally:
        await http.aclose()
        await gw.close()
