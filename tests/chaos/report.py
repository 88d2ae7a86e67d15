"""The books of a chaos run: the figures, and the report that backs each nonzero one.

At the end, the recorder replays what the streams stored: LLM_DONE in full,
and what LLM_OUT stored as the harness's archive kept it (archive.py: a
durable consumer on LLM_OUT that the harness reads from the run's start and
acks as it keeps; nothing in the services reads it; LLM_OUT itself keeps
chunks only `out_max_age_s` in this run), so every figure keeps its meaning:
a restart from scratch shows as a seq with two contents or a Final whose
text is not the streamed text (`inconsistent`);
the report says, for each stream started over, whether its first copy had
aged out. The archive's own holes (what aged out of LLM_OUT before it was
read) are reported as the harness's, beside the figures they would touch.

`done_missing`: the terminals LLM_OUT stored (read there by the archive)
that LLM_DONE never got. LLM_DONE copies them from LLM_OUT with a stream
source, the same server-side copy as a mirror; one it skipped would be a
terminal lost for every later lookup (idempotency, the SDK's replay), so it
is a product figure and must be 0. LLM_DONE is read again for a while before
one counts (its source may still be catching up).

The report: the run's notes (config, routers, refusals, resubmissions, long
generations, peak RSS, proxies), the faults with the unavailability after
each, what LLM_REQ / LLM_WORK still hold (evidence for `stranded`), each
worker id's heartbeats, then for each nonzero figure a few requests: what
was seen of them, the stream restarts, the fault nearest their terminal and
the process log lines that name them.

Unavailability: for each fault, the seconds from its start until the first
Final the harness received live for a request whose first work item went out
(seen live on `llm.work.>`) at or after the fault's start: how long until
the system served new work end to end again. "n/a": no request was
dispatched after it.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from tests.chaos.archive import OutArchive, mirror_lines
from tests.chaos.cluster import ClusterFaults, SourceWatch
from tests.chaos.faults import LaneView
from tests.chaos.ledger import (
    STORE_DONE_ALL,
    Figures,
    Seen,
    describe,
    judge,
    parse_output,
    read_stream,
    stream_runs,
)
from tests.chaos.load import Publisher
from tests.chaos.resubmit import Resubmission
from tests.chaos.tenants import TenantSpy, permission_violations

DONE_WAIT_S = 30.0  # how long LLM_DONE is read again for a terminal it lacks


def _matches(pattern: str, subject: str) -> bool:
    """NATS subject matching (`*` one token, `>` the rest)."""
    pt, st = pattern.split("."), subject.split(".")
    for i, tok in enumerate(pt):
        if tok == ">":
            return len(st) > i
        if i >= len(st) or (tok != "*" and tok != st[i]):
            return False
    return len(pt) == len(st)


@dataclass
class Outcome:
    figures: Figures
    run_dir: Path
    report: list[str] = field(default_factory=list)
    # tenant -> terminals of its own requests its spy received (none: the spy saw nothing)
    spied: dict[str, int] = field(default_factory=dict)
    # the broker's refusals but those by design (tenants.permission_violations): what, how often
    permission_violations: dict[str, int] = field(default_factory=dict)
    died: list[str] = field(default_factory=list)  # services that exited on their own


class BooksView(LaneView, Protocol):
    """What the books read of the run (scenario.Run), besides what the fault lanes use."""

    dir: Path
    t0_wall: float
    faults: list[tuple[float, str]]  # (wall time, what) of each FAULT line logged
    orch_starts: Counter[int]
    spies: list[TenantSpy]  # one per tenant account (tenants.py)
    t0: float  # monotonic time of the run's start (t0_wall on the wall clock)
    cluster_faults: ClusterFaults | None  # a cluster run's node faults (elections timed)
    source_watch: SourceWatch | None  # a cluster run: how far LLM_OUT's copies fell behind
    archive: OutArchive | None  # the harness's copy of LLM_OUT (archive.py), once started


class Books:
    """Reads the run's end state once the load, the faults and the drain are over."""

    def __init__(self, run: BooksView, long_hits: dict[str, list[str]],
                 resubmits: dict[str, Resubmission]) -> None:
        self.cfg, self.dir, self.t0_wall, self.log = run.cfg, run.dir, run.t0_wall, run.log
        self.server, self.fleet, self.rec, self.nc_rec = run.server, run.fleet, run.rec, run.nc_rec
        self.pub, self.wproxy, self.oproxy = run.pub, run.wproxy, run.oproxy
        self.faults, self.counts, self.orch_starts = run.faults, run.counts, run.orch_starts
        self.long_hits, self.resubmits = long_hits, resubmits
        self.spies = run.spies
        self.t0, self.cluster_faults = run.t0, run.cluster_faults
        self.source_watch = run.source_watch
        assert run.archive is not None, "the books read the archive the run started"
        self.archive = run.archive

    def _violations(self) -> tuple[Counter[str], Counter[str]]:
        """The broker's refusals, every node's log together (tenants.permission_violations)."""
        found: Counter[str] = Counter()
        expected: Counter[str] = Counter()
        for proc in self.server.procs:
            f, e = permission_violations(proc.log)
            found.update(f)
            expected.update(e)
        return found, expected

    async def stranded(self) -> int:
        assert self.nc_rec is not None
        js = self.nc_rec.jetstream()
        left = -1
        for _ in range(30):  # acks settle shortly after the last terminal
            left = 0
            for stream in ("LLM_REQ", "LLM_WORK"):
                try:
                    left += (await js.stream_info(stream)).state.messages
                except Exception as exc:
                    self.log(f"stream_info {stream}: {exc!r}")
            if left == 0:
                break
            await asyncio.sleep(0.5)  # poll for the acks to settle (bounded: 30 tries)
        return left

    async def _stream_lines(self) -> list[str]:
        """Messages and consumers of LLM_REQ / LLM_WORK at the end (evidence for `stranded`)."""
        assert self.nc_rec is not None
        js = self.nc_rec.jetstream()
        out: list[str] = []
        for stream in ("LLM_REQ", "LLM_WORK"):
            try:
                info = await js.stream_info(stream, subjects_filter=">")
                subjects = dict(sorted((info.state.subjects or {}).items())[:12])
                out.append(f"{stream}: {info.state.messages} messages, by subject {subjects}")
                consumers = await js.consumers_info(stream)
                filters = [c.config.filter_subject or ">" for c in consumers]
                orphans = [subj for subj in subjects
                           if not any(_matches(f, subj) for f in filters)]
                if orphans:
                    out.append(f"    subjects no consumer of {stream} reads: {orphans}")
                for c in consumers:
                    if c.num_pending or c.num_ack_pending or c.num_redelivered:
                        out.append(
                            f"    consumer {c.name} filter={c.config.filter_subject} "
                            f"pending={c.num_pending} ack_pending={c.num_ack_pending} "
                            f"redelivered={c.num_redelivered} waiting={c.num_waiting} "
                            f"delivered_seq={c.delivered.stream_seq if c.delivered else None}")
            except Exception as exc:
                out.append(f"{stream}: unreadable {exc!r}")
        return out

    def _beat_lines(self) -> list[str]:
        """Each worker id's heartbeats (wall clock), for a worker that went silent or stuck."""
        return ["heartbeats per worker id (first, last, count, last brief): " + "; ".join(
            f"{w}: {b[0] - self.t0_wall:.1f}s..{b[1] - self.t0_wall:.1f}s n={b[2]} {b[3]}"
            for w, b in sorted(self.rec.beats.items()))]

    def _restart_lines(self, seen: Seen | None) -> list[str]:
        """Each live run that streamed a seq again (a stream started over), and whether that
        seq's first copy was still in LLM_OUT then (worker clocks)."""
        if seen is None:
            return []
        first_at: dict[int, float] = {}  # seq -> worker clock (ms) of its first live copy
        out: list[str] = []
        for w, a, b, t0, t1 in stream_runs(seen.arrivals):
            if a in first_at:
                age = (t0 - first_at[a]) / 1000
                where = ("had aged out of" if age > self.cfg.out_max_age_s else "was still in")
                out.append(f"    {w} streamed seq {a}.. again {age:.1f}s after its first copy, "
                           f"which {where} LLM_OUT (max_age {self.cfg.out_max_age_s:.0f}s)")
            elif a > 0 and a - 1 not in first_at:
                out.append(f"    {w} streamed from seq {a} while seq {a - 1} was never seen live "
                           f"(a gap it continued after)")
            for seq in range(a, b + 1):
                first_at.setdefault(seq, t0 + (t1 - t0) * (seq - a) / max(1, b - a))
        return out[:4]

    def _kinds(self, rids: list[str]) -> str:
        assert self.pub is not None
        long = [r for r in rids if r in self.pub.long]
        again = [r for r in rids if r in self.resubmits and r not in long]
        other = [r for r in rids if r not in long and r not in again]
        return f"long: {' '.join(long) or '-'}; resubmitted: {' '.join(again) or '-'}; " \
               f"other: {' '.join(other) or '-'}"

    def _near_fault(self, seen: Seen | None) -> str:
        """The fault closest in time to a request's first terminal (ts_ms, worker clock)."""
        stamps = [o.get("ts_ms", 0) / 1000 for o, _ in (seen.terminals.values() if seen else [])]
        stamps = [t for t in stamps if t]
        if not stamps or not self.faults:
            return "    (no terminal time to place among the faults)"
        first = min(stamps)
        t, what = min(self.faults, key=lambda f: abs(f[0] - first))
        return f"    first terminal at {first:.3f}: nearest fault {what} at {t:.3f} ({first - t:+.2f}s)"

    def _grep(self, rid: str, limit: int = 12) -> list[str]:
        hits: list[str] = []
        for path in sorted(self.dir.glob("*.log")):
            if path.name == "harness.log":
                continue
            with open(path, errors="replace") as fh:
                for line in fh:
                    if rid in line:
                        hits.append(f"    {path.name}: {line.rstrip()[:300]}")
                        if len(hits) >= limit:
                            return hits
        return hits

    def _unavailable(self, t_fault: float) -> float | None:
        """Seconds from t_fault to the first live Final of a request first dispatched after it."""
        best: float | None = None
        for rid, t_work in self.rec.first_work_at.items():
            t_fin = self.rec.final_live_at.get(rid)
            if t_work < t_fault or t_fin is None:
                continue
            if best is None or t_fin - t_fault < best:
                best = t_fin - t_fault
        return best

    def _stalled(self, t_fault: float, window_s: float = 30.0) -> float:
        """Seconds new requests went unanswered at publish after a fault: the longest
        wait of a publish pending in [fault, fault + window_s] (from the later of its
        first try and the fault to its ack or refusal; one never answered counts to
        the window's end)."""
        assert self.pub is not None
        t = self.t0 + (t_fault - self.t0_wall)  # the publisher's clock is monotonic
        worst = 0.0
        for first, answered in self.pub.waits:
            end = answered if answered is not None else t + window_s
            if first <= t + window_s and end >= t:
                worst = max(worst, min(end, t + window_s) - max(first, t))
        return worst

    def _fault_lines(self) -> list[str]:
        out = ["faults (wall clock; unavailable = fault start -> first live Final of a "
               "request dispatched after it; stalled = the longest a publish pending in the "
               "30 s after it waited for its ack or refusal):"]
        for t, what in self.faults:
            u = self._unavailable(t)
            out.append(f"    {t:.3f} (+{t - self.t0_wall:6.1f}s) unavailable "
                       f"{'n/a' if u is None else f'{u:5.2f}s'} stalled "
                       f"{self._stalled(t):5.2f}s  {what}")
        return out

    def _latency_lines(self, pub: Publisher) -> list[str]:
        """Publish ack -> first live chunk, every accepted request with one, through the
        whole run (faults included)."""
        ttft = sorted(max(0.0, self.rec.first_chunk_at[r] - t) for r, t in pub.accepted.items()
                      if r in self.rec.first_chunk_at and t > 0)
        if not ttft:
            return ["first token after the ack: none seen"]

        def q(p: float) -> float:
            return ttft[min(len(ttft) - 1, int(p * len(ttft)))] * 1000

        return [f"first token after the ack, through the run ({len(ttft)} requests): "
                f"p50 {q(0.5):.0f} ms, p90 {q(0.9):.0f} ms, p99 {q(0.99):.0f} ms, "
                f"max {ttft[-1] * 1000:.0f} ms"]

    def _long_lines(self, pub: Publisher) -> list[str]:
        out = [f"long generations: {len(pub.long)} publishes tried, "
               f"{sum(1 for r in pub.long if r in pub.accepted)} accepted; "
               f"{len(self.long_hits)} hit by a fault after their head aged out of LLM_OUT "
               f"(max_age {self.cfg.out_max_age_s:.0f}s)"]
        for rid in sorted(pub.long):
            if rid not in pub.accepted:
                continue
            seen = self.rec.by_id.get(rid)
            terms = [o for o, _ in seen.terminals.values()] if seen else []
            res = "; ".join(
                f"{t.get('type')} {t.get('finish_reason') or t.get('code')} "
                f"tokens={(t.get('usage') or {}).get('completion_tokens')} "
                f"chunks={t.get('chunks')} workers={t.get('workers')}" for t in terms) or "none"
            seqs = len(seen.chunks) if seen else 0
            bad = sum(1 for c in seen.chunks.values() if len(c) > 1) if seen else 0
            out.append(f"    {rid} max_tokens={pub.long[rid]} seqs seen={seqs} "
                       f"seqs with two contents={bad} hits={self.long_hits.get(rid, [])} "
                       f"terminal: {res}")
        return out

    def _tenant_lines(self, pub: Publisher) -> list[str]:
        """The tenants' side: requests per tenant, outputs on another tenant's subjects
        (system side), what each spy saw, and the broker's permission violations."""
        wrong = sorted(rid for rid, seen in self.rec.tenants.items()
                       if rid in pub.tenant_of and seen != {pub.tenant_of[rid]})
        per = Counter(pub.tenant_of[r] for r in pub.accepted if r in pub.tenant_of)
        denied, by_design = self._violations()
        return [
            f"tenants: accepted per tenant {dict(per)}; ids whose outputs came on another "
            f"tenant's subjects (or none): {len(wrong)} "
            + " ".join(f"{r}:{sorted(map(str, self.rec.tenants[r]))}" for r in wrong[:5]),
            *(spy.line() for spy in self.spies),
            f"permission violations in {', '.join(p.log.name for p in self.server.procs)}: "
            f"{sum(denied.values())}"
            + "".join(f"\n    {n}x {what}" for what, n in denied.most_common(20)),
            f"refused by design (a worker's try to create a missing stream: "
            f"bus/streams_ready.py): {sum(by_design.values())}"
            + "".join(f"\n    {n}x {what}" for what, n in by_design.most_common(5)),
        ]

    async def _done_check(self, fig: Figures, out_msgs: list[tuple[int, str, bytes]],
                          done_msgs: list[tuple[int, str, bytes]]) -> list[str]:
        """`done_missing`: terminals in LLM_OUT (the archive) that LLM_DONE lacks, LLM_DONE
        read again (bounded) while any is missing: in full, then each missing one's subject."""
        assert self.nc_rec is not None
        nc, notes = self.nc_rec, self.rec.notes

        def terminals(msgs: list[tuple[int, str, bytes]]) -> dict[tuple[str, bytes], int]:
            """(stored subject, data) -> seq, for every terminal of `msgs`."""
            out: dict[tuple[str, bytes], int] = {}
            for seq, subject, data in msgs:
                parsed = parse_output(subject)
                if parsed is not None and parsed[0] == "done":
                    out.setdefault((subject, data), seq)
            return out

        in_out, in_done = terminals(out_msgs), terminals(done_msgs)
        missing = set(in_out) - set(in_done)
        t0 = time.monotonic()
        while missing and time.monotonic() - t0 < DONE_WAIT_S:
            await asyncio.sleep(2.0)  # LLM_DONE's source may still be copying (bounded)
            again = await read_stream(nc, "LLM_DONE", STORE_DONE_ALL, notes)
            in_done.update(terminals(again or []))
            missing = set(in_out) - set(in_done)
        for subject in sorted({s for s, _ in missing})[:50]:  # each one's own subject, last
            got = await read_stream(nc, "LLM_DONE", subject, notes, timeout_s=10.0)
            in_done.update(terminals(got or []))
        missing = set(in_out) - set(in_done)
        fig.done_missing = len(missing)
        lines = [f"terminals: LLM_OUT (the archive) {len(in_out)}, LLM_DONE {len(in_done)}; "
                 f"in LLM_OUT but never in LLM_DONE (done_missing, LLM_DONE read for "
                 f"{time.monotonic() - t0:.0f}s): {len(missing)}; in LLM_DONE but not in the "
                 f"archive (the archive's holes): {len(set(in_done) - set(in_out))}"]
        done_subjects = {s for s, _ in in_done}
        for subject, data in sorted(missing, key=lambda k: in_out[k]):
            parsed = parse_output(subject)
            rid = parsed[3] if parsed is not None else subject
            if parsed is not None and parsed[2] == "i":
                fig.sample("done_missing", rid)
            if len(lines) <= 10:
                lines.append(f"    LLM_OUT seq {in_out[(subject, data)]} {subject}: "
                             f"{data[:160]!r}; LLM_DONE has "
                             + ("another terminal" if subject in done_subjects else "none")
                             + " on that subject")
        return lines

    async def books(self, pub: Publisher, hung: set[str]) -> Outcome:
        assert self.nc_rec is not None
        fig = Figures(refused=pub.refused_total)
        fig.stranded = await self.stranded()
        self.fleet.sample_rss()
        fig.max_rss_mb = self.fleet.max_rss_mb()
        await self.archive.settle()
        done_msgs = await read_stream(self.nc_rec, "LLM_DONE", STORE_DONE_ALL, self.rec.notes)
        self.rec.take_stored(done_msgs or [])
        out_msgs = self.archive.stored()
        self.rec.take_stored(out_msgs)
        n_done, n_out = (-1 if done_msgs is None else len(done_msgs)), len(out_msgs)
        done_lines = await self._done_check(fig, out_msgs, done_msgs or [])
        for rid in list(pub.ambiguous):
            if rid in self.rec.by_id:
                pub.accepted[rid] = 0.0
                pub.ambiguous.discard(rid)
        fig.accepted = len(pub.accepted)
        for r in self.resubmits.values():
            r.settle(self.rec.by_id[r.rid])
        silent = sorted(r.rid for r in self.resubmits.values() if r.outcome == "silent")
        fig.hung = len(hung) + len(silent)
        fig.pauses = self.counts["pauses"]
        fig.partitions = self.counts["partitions"]
        fig.long_generations = sum(1 for r in pub.long if r in pub.accepted)
        fig.resubmitted = self.counts["resubmitted"]
        fig.leaks = sum(s.leaks for s in self.spies)
        fig.node_kills = self.counts["node_kills"]
        for rid in pub.accepted:
            judge(fig, rid, self.rec.by_id.get(rid))
        for rid in [*sorted(hung), *silent][:8]:
            fig.sample("hung", rid)
        unknown = set(self.rec.by_id) - set(pub.accepted)
        rep = [
            f"run dir: {self.dir}",
            f"seed={self.cfg.seed} config={self.cfg}",
            "routers per orchestrator start: " + ", ".join(
                f"orch{i}: " + "/".join(self.cfg.router_for(i, k)
                                        for k in range(self.orch_starts[i]))
                for i in range(len(self.fleet.orchestrators))),
            f"replayed LLM_DONE={n_done} LLM_OUT (the archive)={n_out}; "
            f"live terminals={len(self.rec.live_terminal)}",
            *self.archive.report_lines(self.cfg.out_max_age_s),
            *(await mirror_lines(self.nc_rec, self.archive)),
            *done_lines,
            f"refusals: {dict(pub.refused)}",
            f"ambiguous publishes (no answer within {pub.retry_s}s): {len(pub.ambiguous)} "
            f"{sorted(pub.ambiguous)[:10]}",
            f"publish retries: {pub.retries}; overload phase accepted={pub.overload_accepted} "
            f"refused={pub.overload_refused}",
            f"error codes: {dict(fig.codes)}",
            f"outputs for ids never accepted: {len(unknown)} {sorted(unknown)[:5]}; "
            f"undecodable: {len(self.rec.undecodable)}; request_id != subject: {self.rec.foreign}",
            f"notes: {self.rec.notes}",
            f"processes that died on their own: {self.fleet.dead_unexpectedly()}",
            *self._tenant_lines(pub),
            "peak RSS (VmHWM) MB: orchestrators %d, workers %d, nats-server %d" % (
                max((p.peak_kb for p in self.fleet.orchestrators), default=0) // 1024,
                max((p.peak_kb for p in self.fleet.all_procs()
                     if p not in self.fleet.orchestrators), default=0) // 1024,
                max(p.peak_kb for p in self.server.procs) // 1024),
            "proxies: " + "; ".join(px.stats() for px in (self.wproxy, self.oproxy)
                                    if px is not None),
            f"hung: {len(hung)} accepted without a terminal after the drain, {len(silent)} "
            f"resubmissions answered by nothing within {self.cfg.resubmit_wait_s:.0f}s",
            "resubmissions (window %.0fs): %s" % (self.cfg.dup_window_s, "; ".join(
                f"{r.rid} ack={r.ack} {r.outcome}"
                + (f" after {r.wait_s:.2f}s" if r.wait_s else "")
                for r in self.resubmits.values()) or "none"),
            *self._long_lines(pub),
            *self._latency_lines(pub),
            *(self.cluster_faults.report_lines() if self.cluster_faults is not None else []),
            *(self.source_watch.report_lines(self.cfg.out_max_age_s)
              if self.source_watch is not None else []),
            *self._fault_lines(),
            *(await self._stream_lines()),
            *self._beat_lines(),
        ]
        for kind, rids in fig.samples.items():
            rep.append(f"--- {kind}: {getattr(fig, kind)} (samples; all by kind: "
                       f"{self._kinds(fig.ids[kind])})")
            for rid in rids:
                if rid in self.resubmits:
                    r = self.resubmits[rid]
                    rep.append(f"{rid}: RESUBMITTED at {r.at:.3f} after its windows "
                               f"(ack {r.ack}): {r.outcome}" + (
                                   f" (no terminal within {self.cfg.resubmit_wait_s:.0f}s)"
                                   if r.outcome.startswith(("silent", "late"))
                                   else f" after {r.wait_s:.2f}s"))
                rep.append(describe(rid, self.rec.by_id.get(rid)))
                rep.extend(self._restart_lines(self.rec.by_id.get(rid)))
                rep.append(self._near_fault(self.rec.by_id.get(rid)))
                rep.extend(self._grep(rid))
        return Outcome(fig, self.dir, rep, {s.tenant: s.own_outputs["done"] for s in self.spies},
                       dict(self._violations()[0]), self.fleet.dead_unexpectedly())
