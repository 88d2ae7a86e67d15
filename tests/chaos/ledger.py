"""What the chaos run saw: every chunk and terminal, live and stored, and the figures.

Live: core subscriptions on `llm.out.>` and `llm.done.>` made before the
first publish, on the operator's connection (it sees all of the system's
account: a tenant's outputs are on `llm.out.<tenant>.<group>.<id>`,
`llm.done.<tenant>.<group>.<id>`, stored on `llm.s.out.<tenant>...` /
`llm.s.done.<tenant>...`; `parse_output` reads either form: the group is the
second-last token, the request id the last). Interactive outputs only
(group `i`); the tenant a request's outputs came on is kept
(`Recorder.tenants`: the books check it is the one that published it). Stored: what LLM_OUT stored, as the harness's archive
kept it (archive.py: a durable consumer on LLM_OUT read from the run's start;
LLM_OUT itself keeps chunks only seconds in this run), and LLM_DONE in full.
A terminal is identified by its whole JSON content, so the same stored
message seen twice (live and replayed) counts once; two different Finals,
or a Final and an ErrorReply, are two terminals.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from tests.waiting import subscribed

OUT_ALL = "llm.out.>"
DONE_ALL = "llm.done.>"
# Where the streams store outputs (republished to the subjects above once stored).
STORE_ALL = "llm.s.>"
STORE_DONE_ALL = "llm.s.done.>"
WORK_PREFIX = "llm.work."
HB_PREFIX = "llm.hb."
GROUP = "i"  # the load's requests are interactive-group ones


def done_subject(tenant: str | None, rid: str, stored: bool = False) -> str:
    """`llm.done.<tenant>.i.<id>` (`llm.s.done...` when `stored`); without a tenant,
    `llm.done.i.<id>`."""
    return ".".join(["llm", *(["s"] if stored else []), "done", *([tenant] if tenant else []),
                     GROUP, rid])


def parse_output(subject: str) -> tuple[str, str | None, str, str] | None:
    """An output subject, live or stored, with or without a tenant, as (kind `out` /
    `done`, tenant or None, group, request id); None for any other subject."""
    tokens = subject.split(".")
    if tokens[:2] == ["llm", "s"]:
        tokens = ["llm", *tokens[2:]]
    if tokens[0] != "llm" or len(tokens) not in (4, 5) or tokens[1] not in ("out", "done"):
        return None
    return tokens[1], (tokens[2] if len(tokens) == 5 else None), tokens[-2], tokens[-1]


def canonical(obj: dict[str, Any]) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


@dataclass
class Seen:
    """Everything seen for one request id."""

    # seq -> {token_ids tuple: (text, where)}; more than one key = inconsistent
    chunks: dict[int, dict[tuple[int, ...], tuple[str, str]]] = field(
        default_factory=lambda: defaultdict(dict))
    live_seqs: set[int] = field(default_factory=set)
    stored_seqs: set[int] = field(default_factory=set)
    # canonical JSON -> (decoded terminal, where: live / stored / live+stored)
    terminals: dict[str, tuple[dict[str, Any], str]] = field(default_factory=dict)
    live_copies: int = 0  # terminal messages received live (repeats included)
    chunk_workers: set[str] = field(default_factory=set)
    # work items seen live on llm.work.> (who dispatched it, where, which attempt)
    work: list[str] = field(default_factory=list)
    # live chunks in arrival order: (seq, worker id, ts_ms of the worker's clock)
    arrivals: list[tuple[int, str, float]] = field(default_factory=list)


class Recorder:
    def __init__(self) -> None:
        self.by_id: dict[str, Seen] = defaultdict(Seen)
        self.live_terminal: set[str] = set()
        self.undecodable: list[str] = []
        self.notes: list[str] = []
        self.foreign = 0  # messages on our subjects whose request_id differs from the subject
        self.tenants: dict[str, set[str | None]] = defaultdict(set)  # id -> tenants of its outputs
        self.last_chunk_at: dict[str, float] = {}  # worker id -> monotonic time of its last chunk
        # request id -> (worker id, monotonic time) of its last live chunk
        self.streaming: dict[str, tuple[str, float]] = {}
        self.first_chunk_at: dict[str, float] = {}  # request id -> monotonic time, first live chunk
        self.first_work_at: dict[str, float] = {}  # request id -> wall time its first work item went out
        self.final_live_at: dict[str, float] = {}  # request id -> wall time of its first live Final
        # worker id -> [first and last heartbeat (wall time), count, the last one's brief]
        self.beats: dict[str, list[Any]] = {}

    def _chunk(self, rid: str, obj: dict[str, Any], where: str) -> None:
        seen = self.by_id[rid]
        seq = int(obj.get("seq", -1))
        tids = tuple(obj.get("token_ids") or ())
        copies = seen.chunks[seq]
        if tids in copies:
            text, w = copies[tids]
            if where not in w:
                copies[tids] = (text, w + "+" + where)
        else:
            copies[tids] = (obj.get("text", ""), where)
        (seen.live_seqs if where == "live" else seen.stored_seqs).add(seq)
        if where == "live":
            self.first_chunk_at.setdefault(rid, time.monotonic())
            seen.arrivals.append((seq, str(obj.get("worker_id", "")), float(obj.get("ts_ms", 0))))
        if obj.get("worker_id"):
            seen.chunk_workers.add(obj["worker_id"])
            if where == "live":
                self.last_chunk_at[obj["worker_id"]] = time.monotonic()
                self.streaming[rid] = (obj["worker_id"], time.monotonic())

    def _terminal(self, rid: str, obj: dict[str, Any], where: str) -> None:
        seen = self.by_id[rid]
        key = canonical(obj)
        if where == "live":
            seen.live_copies += 1
            self.live_terminal.add(rid)
            self.streaming.pop(rid, None)
            if obj.get("type") == "final":
                self.final_live_at.setdefault(rid, time.time())
        old = seen.terminals.get(key)
        if old is None:
            seen.terminals[key] = (obj, where)
        elif where not in old[1]:
            seen.terminals[key] = (obj, old[1] + "+" + where)

    def _work(self, subject: str, data: bytes) -> None:
        try:
            items = json.loads(data).get("items") or []
        except (ValueError, AttributeError):
            return
        at = time.time()
        for it in items:
            if not isinstance(it, dict) or not isinstance(it.get("request"), dict):
                continue
            rid = str(it["request"].get("request_id", ""))
            self.first_work_at.setdefault(rid, at)
            self.by_id[rid].work.append(
                f"{at:.3f} {subject} attempt={it.get('attempt', 1)} "
                f"next_seq={it.get('next_seq', 0)} redispatched={it.get('redispatched', False)} "
                f"orch={it.get('orchestrator_id', '')} served_by={it.get('served_by', [])}")

    async def on_work(self, msg: Msg) -> None:
        self._work(msg.subject, msg.data)

    def take(self, subject: str, data: bytes, where: str) -> None:
        parsed = parse_output(subject)
        if parsed is None or parsed[2] != GROUP:
            return
        kind, tenant, _, rid = parsed
        is_chunk = kind == "out"
        self.tenants[rid].add(tenant)
        try:
            obj = json.loads(data)
            if not isinstance(obj, dict):
                raise ValueError("not an object")
        except ValueError:
            self.undecodable.append(f"{where} {subject} {data[:120]!r}")
            return
        if obj.get("request_id") != rid:
            self.foreign += 1
        if is_chunk:
            self._chunk(rid, obj, where)
        else:
            self._terminal(rid, obj, where)

    async def on_hb(self, msg: Msg) -> None:
        try:
            hb = json.loads(msg.data)
        except ValueError:
            return
        if not isinstance(hb, dict):
            return
        wid = str(hb.get("worker_id", msg.subject.rsplit(".", 1)[-1]))
        now = time.time()
        # fields at their default are left out of the message: state ready, counts 0
        brief = {"state": hb.get("state", "ready"),
                 **{k: hb.get(k, 0) for k in ("running", "held_items", "served")}}
        b = self.beats.setdefault(wid, [now, now, 0, brief])
        b[1], b[2], b[3] = now, b[2] + 1, brief

    async def on_live(self, msg: Msg) -> None:
        self.take(msg.subject, msg.data, "live")

    async def subscribe(self, nc: NATS) -> None:
        await nc.subscribe(OUT_ALL, cb=self.on_live, pending_msgs_limit=2_000_000,
                           pending_bytes_limit=1 << 30)
        await nc.subscribe(DONE_ALL, cb=self.on_live, pending_msgs_limit=2_000_000,
                           pending_bytes_limit=1 << 30)
        await nc.subscribe(WORK_PREFIX + ">", cb=self.on_work, pending_msgs_limit=2_000_000,
                           pending_bytes_limit=1 << 30)
        await nc.subscribe(HB_PREFIX + "*", cb=self.on_hb)
        await subscribed(nc)  # live before the services publish (not just flushed)

    def has_terminal(self, rid: str) -> bool:
        seen = self.by_id.get(rid)
        return bool(seen and seen.terminals)

    async def replay(self, nc: NATS, stream: str, subject: str, timeout_s: float = 120.0) -> int:
        """Read every message of `subject` stored in `stream` as stored; returns the count
        (-1: the stream unreadable)."""
        msgs = await read_stream(nc, stream, subject, self.notes, timeout_s)
        if msgs is None:
            return -1
        self.take_stored(msgs)
        return len(msgs)

    def take_stored(self, msgs: list[tuple[int, str, bytes]]) -> None:
        """Messages read back from a stream (or the harness's archive of LLM_OUT)."""
        for _, subject, data in msgs:
            self.take(subject, data, "stored")


async def read_stream(nc: NATS, stream: str, subject: str, notes: list[str],
                      timeout_s: float = 120.0) -> list[tuple[int, str, bytes]] | None:
    """Every message of `subject` stored in `stream` (pull, batches) as (seq, subject,
    data); None when the stream is unreadable (noted in `notes`)."""
    js = nc.jetstream()
    try:
        info = await js.stream_info(stream)
    except Exception as exc:  # e.g. a memory stream gone after a broker restart
        notes.append(f"replay: stream {stream} unreadable: {exc!r}")
        return None
    last = info.state.last_seq
    out: list[tuple[int, str, bytes]] = []
    if info.state.messages == 0:
        return out
    psub = await js.pull_subscribe(subject, stream=stream, config=_replay_config())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    try:
        while loop.time() < deadline:
            try:
                msgs = await psub.fetch(1000, timeout=2.0)
            except TimeoutError:
                break
            done = False
            for m in msgs:
                out.append((m.metadata.sequence.stream, m.subject, m.data))
                if m.metadata.sequence.stream >= last or m.metadata.num_pending == 0:
                    done = True
            if done:
                break
    finally:
        await psub.unsubscribe()
    return out


def _replay_config() -> Any:
    from nats.js.api import AckPolicy, ConsumerConfig

    return ConsumerConfig(deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE,
                          inactive_threshold=30.0, max_ack_pending=-1)


@dataclass
class Figures:
    accepted: int = 0
    refused: int = 0
    completed: int = 0
    errored: int = 0
    lost: int = 0
    dup_terminals: int = 0
    gaps: int = 0
    inconsistent: int = 0
    stranded: int = 0
    hung: int = 0
    max_rss_mb: int = 0
    # what the run injected: pause faults (SIGSTOP/SIGCONT), partition faults (proxy
    # blackhole, delay, reset), long generations accepted, finished ids published again
    pauses: int = 0
    partitions: int = 0
    long_generations: int = 0
    resubmitted: int = 0
    # messages a tenant's account received that name another tenant (tenants.py spies)
    leaks: int = 0
    node_kills: int = 0  # nats-server processes killed -9 (a cluster's nodes, or the one server)
    # terminals LLM_OUT stored (the harness's archive read them there) that LLM_DONE, which
    # copies them from LLM_OUT (a stream source), never got: a terminal lost for lookups
    done_missing: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    samples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    ids: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))  # every one

    def line(self) -> str:
        return ("chaos: accepted=%d refused=%d completed=%d errored=%d lost=%d dup_terminals=%d "
                "gaps=%d inconsistent=%d stranded=%d hung=%d max_rss_mb=%d pauses=%d "
                "partitions=%d long_generations=%d resubmitted=%d leaks=%d node_kills=%d "
                "done_missing=%d" % (
                    self.accepted, self.refused, self.completed, self.errored, self.lost,
                    self.dup_terminals, self.gaps, self.inconsistent, self.stranded, self.hung,
                    self.max_rss_mb, self.pauses, self.partitions, self.long_generations,
                    self.resubmitted, self.leaks, self.node_kills, self.done_missing))

    def sample(self, kind: str, rid: str) -> None:
        self.ids[kind].append(rid)
        if len(self.samples[kind]) < 8:
            self.samples[kind].append(rid)


def describe(rid: str, seen: Seen | None) -> str:
    """One request's evidence: seqs live vs stored, conflicting copies, every terminal."""
    if seen is None:
        return f"{rid}: nothing seen at all (no chunk, no terminal, live or stored)"
    lines = [f"{rid}: live seqs {_ranges(seen.live_seqs)} | stored seqs "
             f"{_ranges(seen.stored_seqs)} | chunk workers {sorted(seen.chunk_workers)} | "
             f"live terminal copies {seen.live_copies}"]
    lines.extend(f"    work item seen at {w}" for w in seen.work[:6])
    if seen.arrivals:
        lines.append("    live stream runs (worker: seqs, worker clock): " + "; ".join(
            f"{w or '?'}: {a}-{b} at {t0 / 1000:.3f}-{t1 / 1000:.3f}"
            for w, a, b, t0, t1 in stream_runs(seen.arrivals)[:10]))
    for obj, where in seen.terminals.values():
        brief: dict[str, Any] = {k: obj.get(k) for k in (
            "type", "finish_reason", "code", "message", "chunks", "workers", "ts_ms") if k in obj}
        if "usage" in obj:
            brief["completion_tokens"] = obj["usage"].get("completion_tokens")
        brief["text"] = (obj.get("text") or "")[:80]
        lines.append(f"    terminal [{where}] {json.dumps(brief)}")
    conflicts = [seq for seq in sorted(seen.chunks) if len(seen.chunks[seq]) > 1]
    if conflicts:
        lines.append(f"    seqs with differing copies: {_ranges(set(conflicts))}; the first ones:")
    for seq in conflicts[:3]:
        for tids, (text, where) in seen.chunks[seq].items():
            lines.append(f"    seq {seq} [{where}] token_ids={list(tids)[:8]} text={text[:60]!r}")
    return "\n".join(lines)


def stream_runs(arrivals: list[tuple[int, str, float]]
                ) -> list[tuple[str, int, int, float, float]]:
    """Live chunks folded into runs: one worker, consecutive seqs; (worker, first seq,
    last seq, first ts_ms, last ts_ms). A run that starts below where the previous
    one ended is a stream started again."""
    runs: list[tuple[str, int, int, float, float]] = []
    for seq, worker, ts in arrivals:
        if runs and runs[-1][0] == worker and seq == runs[-1][2] + 1:
            w, a, _, t0, _ = runs[-1]
            runs[-1] = (w, a, seq, t0, ts)
        else:
            runs.append((worker, seq, seq, ts, ts))
    return runs


def _ranges(seqs: set[int]) -> str:
    if not seqs:
        return "-"
    out, items = [], sorted(seqs)
    start = prev = items[0]
    for s in [*items[1:], None]:
        if s is not None and s == prev + 1:
            prev = s
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if s is not None:
            start = prev = s
    return ",".join(out)


def judge(fig: Figures, rid: str, seen: Seen | None) -> None:
    """Classify one accepted request into the figures."""
    if seen is None or not seen.terminals:
        fig.lost += 1
        fig.sample("lost", rid)
        return
    terms = [obj for obj, _ in seen.terminals.values()]
    if len(terms) > 1:
        fig.dup_terminals += 1
        fig.sample("dup_terminals", rid)
    finals = [t for t in terms if t.get("type") == "final"]
    if finals:
        fig.completed += 1
    else:
        fig.errored += 1
        for t in terms:
            fig.codes[str(t.get("code", t.get("type")))] += 1
    bad_tokens = any(len(copies) > 1 for copies in seen.chunks.values())
    gap = False
    bad_text = False
    for f in finals:
        n = int(f.get("chunks", 0))
        if any(s not in seen.chunks for s in range(n)):
            gap = True
            continue
        streamed = "".join(next(iter(seen.chunks[s].values()))[0] for s in range(n))
        if streamed != (f.get("text") or ""):
            bad_text = True
    if gap:
        fig.gaps += 1
        fig.sample("gaps", rid)
    if bad_tokens or bad_text:
        fig.inconsistent += 1
        fig.sample("inconsistent", rid)
