"""Workloads for the fleet simulator: real traces, synthetic streams, and tools on them.

Traces (`load_trace` picks by suffix):
- Azure LLM inference CSV (`TIMESTAMP,ContextTokens,GeneratedTokens`): ids
  `az-<row>`, no block hashes.
- Mooncake JSONL (`timestamp` ms, `input_length`, `output_length`,
  `hash_ids`, one id per 512-token block): ids `mc-<record>`. An optional
  `session` string (not in Mooncake's own files; `write_mooncake` adds it)
  keeps a conversation's turns together.
Both are returned in file order, with arrival_ms relative to the first row
(row/record numbers count from 0, header and blank lines excluded).

Class assignment rule (`assign_classes`), for traces that carry no tenants,
priorities or SLO classes: for each request and each dimension d in
("tenant", "level", "slo_class") with a weight mapping given,
    u = first 8 bytes of blake2b(f"{seed}:{d}:{key}") as an integer / 2**64
where key is the request's session if it has one (so all turns of a
conversation share their classes) else its request_id; the value is the key
of the weight mapping, taken in sorted order, whose cumulative-weight interval
[c_{i-1}, c_i) / total holds u. A dimension whose mapping is None keeps the
request's value (TraceRequest defaults: tenant "default", level 2 = normal,
slo_class "standard"). The choice depends on nothing but (seed, dimension,
key, weights), so slicing, rescaling or reordering a trace never changes the
classes of the requests kept.
"""

from __future__ import annotations

import csv
import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from cplane.fleetsim.records import TraceRequest
from cplane.fleetsim.synthetic import LengthDist, SyntheticSpec, generate, pick_weighted

__all__ = [
    "LengthDist",
    "SyntheticSpec",
    "assign_classes",
    "generate",
    "load_azure",
    "load_mooncake",
    "load_trace",
    "scale_rate",
    "slice_requests",
    "summary",
    "write_mooncake",
]

_AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
_MOONCAKE_KEYS = ("timestamp", "input_length", "output_length", "hash_ids")


def _ticks(stamp: str) -> int:
    """'2023-11-16 18:15:46.6805900' -> integer 100 ns ticks since the epoch (naive = UTC).

    Parsed by hand: Azure writes 7 fractional digits, one more than datetime
    takes, and integer ticks keep differences exact.
    """
    main, dot, frac = stamp.strip().partition(".")
    if dot and not (frac.isdigit() and len(frac) <= 7):
        raise ValueError(f"bad fractional seconds in {stamp!r}")
    dt = datetime.fromisoformat(main)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp()) * 10_000_000 + int(frac.ljust(7, "0"))


def _count(value: Any, what: str) -> int:
    """A non-negative integer token count, or ValueError."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    n = int(value)
    if n < 0:
        raise ValueError(f"{what} must be >= 0, got {n}")
    return n


def load_azure(path: str | Path, *, limit: int | None = None) -> list[TraceRequest]:
    """Read an Azure LLM inference trace CSV (streaming), at most `limit` rows."""
    out: list[TraceRequest] = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty file, expected header {','.join(_AZURE_COLUMNS)}")
        names = [h.strip() for h in header]
        missing = [c for c in _AZURE_COLUMNS if c not in names]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; header {header}")
        i_ts, i_in, i_out = (names.index(c) for c in _AZURE_COLUMNS)
        t0 = 0
        for row in reader:
            if limit is not None and len(out) >= limit:
                break
            if not row:
                continue
            try:
                ticks = _ticks(row[i_ts])
                prompt = _count(row[i_in], "ContextTokens")
                output = _count(row[i_out], "GeneratedTokens")
            except (ValueError, IndexError) as e:
                raise ValueError(f"{path}:{reader.line_num}: malformed row {row}: {e}") from e
            if not out:
                t0 = ticks
            out.append(TraceRequest(f"az-{len(out)}", (ticks - t0) / 10_000, prompt, output))
    return out


def _mooncake_record(line: bytes, n: int) -> tuple[float, TraceRequest]:
    """One JSONL record -> (timestamp ms, request with arrival_ms still absolute)."""
    rec = orjson.loads(line)
    if not isinstance(rec, dict):
        raise ValueError("expected a JSON object")
    missing = [k for k in _MOONCAKE_KEYS if k not in rec]
    if missing:
        raise ValueError(f"missing key(s) {', '.join(missing)}")
    ts, hashes = rec["timestamp"], rec["hash_ids"]
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
        raise ValueError(f"timestamp must be a number, got {ts!r}")
    if not isinstance(hashes, list) or any(
        isinstance(h, bool) or not isinstance(h, int) for h in hashes
    ):
        raise ValueError("hash_ids must be a list of integers")
    prompt = _count(rec["input_length"], "input_length")
    output = _count(rec["output_length"], "output_length")
    session = rec.get("session", "")
    if not isinstance(session, str):
        raise ValueError(f"session must be a string, got {session!r}")
    return float(ts), TraceRequest(f"mc-{n}", float(ts), prompt, output, tuple(hashes),
                                   session=session)


def load_mooncake(path: str | Path, *, limit: int | None = None) -> list[TraceRequest]:
    """Read a Mooncake trace JSONL (streaming), at most `limit` records."""
    out: list[TraceRequest] = []
    t0 = 0.0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if limit is not None and len(out) >= limit:
                break
            if not line.strip():
                continue
            try:
                ts, req = _mooncake_record(line, len(out))
            except ValueError as e:  # orjson.JSONDecodeError is a ValueError too
                raise ValueError(f"{path}:{lineno}: malformed record: {e}") from e
            if not out:
                t0 = ts
            out.append(replace(req, arrival_ms=ts - t0))
    return out


def write_mooncake(reqs: Iterable[TraceRequest], path: str | Path) -> int:
    """Write `reqs` as Mooncake JSONL (integer ms timestamps, in arrival order), with
    `session` where a request has one; returns the number of records.

    `load_mooncake` reads it back with the same lengths, hashes and sessions
    (arrivals rounded to the millisecond, ids renumbered `mc-<record>`).
    """
    n = 0
    with open(path, "wb") as f:
        for r in sorted(reqs, key=lambda r: r.arrival_ms):
            rec: dict[str, Any] = {"timestamp": round(r.arrival_ms),
                                   "input_length": r.prompt_tokens,
                                   "output_length": r.output_tokens,
                                   "hash_ids": list(r.block_hashes)}
            if r.session:
                rec["session"] = r.session
            f.write(orjson.dumps(rec) + b"\n")
            n += 1
    return n


def load_trace(path: str | Path, **kw: Any) -> list[TraceRequest]:
    """Load a trace by suffix: .csv = Azure, .jsonl/.json = Mooncake."""
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        return load_azure(path, **kw)
    if suffix in (".jsonl", ".json"):
        return load_mooncake(path, **kw)
    raise ValueError(f"{path}: unknown trace format {suffix!r} (expected .csv, .jsonl or .json)")


def _unit(seed: int, dim: str, key: str) -> float:
    """A uniform draw in [0, 1) fixed by (seed, dim, key), same in every process."""
    digest = hashlib.blake2b(f"{seed}:{dim}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def assign_classes(
    reqs: Iterable[TraceRequest],
    *,
    seed: int,
    tenants: Mapping[str, float] | None = None,
    levels: Mapping[int, float] | None = None,
    slo_classes: Mapping[str, float] | None = None,
) -> list[TraceRequest]:
    """Give each request a tenant, level and SLO class by the module docstring's rule."""
    if levels is not None and any(v not in range(5) for v in levels):
        raise ValueError(f"levels must be 0..4: {dict(levels)}")
    out = []
    for r in reqs:
        key = r.session or r.request_id
        changes: dict[str, Any] = {}
        if tenants is not None:
            changes["tenant"] = pick_weighted(tenants, _unit(seed, "tenant", key))
        if levels is not None:
            changes["level"] = pick_weighted(levels, _unit(seed, "level", key))
        if slo_classes is not None:
            changes["slo_class"] = pick_weighted(slo_classes, _unit(seed, "slo_class", key))
        out.append(replace(r, **changes) if changes else r)
    return out


def scale_rate(reqs: Iterable[TraceRequest], factor: float) -> list[TraceRequest]:
    """Compress time by `factor`: arrival_ms / factor (2 = twice the request rate)."""
    if not factor > 0 or not math.isfinite(factor):
        raise ValueError(f"factor must be positive and finite, got {factor}")
    return [replace(r, arrival_ms=r.arrival_ms / factor) for r in reqs]


def slice_requests(
    reqs: Sequence[TraceRequest],
    *,
    start: int = 0,
    count: int | None = None,
    start_ms: float | None = None,
    end_ms: float | None = None,
) -> list[TraceRequest]:
    """Keep arrivals in [start_ms, end_ms), then positions [start, start+count) of those.

    Order and request ids are kept; arrivals are re-based so the first kept one is at 0.
    """
    kept = [
        r for r in reqs
        if (start_ms is None or r.arrival_ms >= start_ms)
        and (end_ms is None or r.arrival_ms < end_ms)
    ]
    kept = kept[start:] if count is None else kept[start : start + count]
    if not kept:
        return []
    t0 = kept[0].arrival_ms
    return [replace(r, arrival_ms=r.arrival_ms - t0) for r in kept]


def _p99(values: Sequence[int]) -> float:
    """Nearest-rank 99th percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return float(ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)])


def summary(reqs: Sequence[TraceRequest]) -> dict[str, Any]:
    """Count, span, rate, length stats, and block reuse (share of blocks seen earlier).

    rate_per_s = count / duration_s, where duration_s spans first to last arrival.
    Block reuse walks the requests in arrival order with an unlimited cache.
    """
    n = len(reqs)
    arrivals = [r.arrival_ms for r in reqs]
    duration_s = (max(arrivals) - min(arrivals)) / 1000.0 if n else 0.0
    prompts = [r.prompt_tokens for r in reqs]
    outputs = [r.output_tokens for r in reqs]
    seen: set[int] = set()
    blocks = reused = 0
    for r in sorted(reqs, key=lambda r: r.arrival_ms):
        for h in r.block_hashes:
            blocks += 1
            if h in seen:
                reused += 1
            else:
                seen.add(h)
    return {
        "count": n,
        "duration_s": duration_s,
        "rate_per_s": n / duration_s if duration_s > 0 else 0.0,
        "prompt_mean": sum(prompts) / n if n else 0.0,
        "prompt_p99": _p99(prompts),
        "output_mean": sum(outputs) / n if n else 0.0,
        "output_p99": _p99(outputs),
        "blocks": blocks,
        "block_reuse": reused / blocks if blocks else 0.0,
        "sessions": len({r.session for r in reqs if r.session}),
        "tenants": _counts(r.tenant for r in reqs),
        "levels": _counts(r.level for r in reqs),
        "slo_classes": _counts(r.slo_class for r in reqs),
    }


def _counts(values: Iterable[str | int]) -> dict[str | int, int]:
    """Occurrences per value, keys in sorted order."""
    c: dict[str | int, int] = {}
    for v in values:
        c[v] = c.get(v, 0) + 1
    return dict(sorted(c.items(), key=lambda kv: str(kv[0])))
