"""Reporting: one rich table row per (policy, router), and JSON files.

A result row is a dict with ``policy``, ``router``, ``goodput`` (a
:class:`~fleetsim.metrics.Goodput`, a float in req/s, or None) and the keys of
:func:`~fleetsim.metrics.summarize` for the run to show (typically the sweep's
reference rate), either flat in the row or nested under ``summary``. Flat keys win.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson
from rich.table import Table

from cplane.fleetsim.metrics import Goodput

_DASH = "-"


def jsonable(obj: Any) -> Any:
    """A copy of ``obj`` that JSON can hold: NaN/inf -> None, dataclasses -> dicts,
    tuples/sets -> lists, non-str keys -> str, paths -> str, numpy scalars/arrays
    -> Python values.
    """
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        items = sorted(obj, key=repr) if isinstance(obj, set | frozenset) else obj
        return [jsonable(v) for v in items]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist"):  # numpy scalar or array, without importing numpy
        return jsonable(obj.tolist())
    return obj


def write_json(path: str | os.PathLike[str], payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` as indented, key-sorted JSON; atomic (temp file + rename)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = orjson.dumps(jsonable(payload), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(data + b"\n")
    # Rename so a reader (or a crashed sweep) never sees half a file.
    tmp.replace(out)
    return out


def _row_values(row: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(row.get("summary") or {})
    merged.update({k: v for k, v in row.items() if k != "summary"})
    return merged


def _num(v: Any, fmt: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return _DASH
    return format(v, fmt)


def _pct(v: Any) -> str:
    s = _num(v, ".4f")
    return s if s == _DASH else f"{100.0 * v:.1f}%"


def _goodput_cell(row: Mapping[str, Any]) -> str:
    g = row.get("goodput")
    if isinstance(g, Goodput):
        return f"{'>=' if g.lower_bound else ''}{g.rate:.2f}"
    if isinstance(g, Mapping):  # a Goodput that went through JSON
        return f"{'>=' if g.get('lower_bound') else ''}{_num(g.get('rate'), '.2f')}"
    bound = ">=" if row.get("goodput_lower_bound") else ""
    return _DASH if g is None else f"{bound}{g:.2f}"


_COLUMNS: tuple[tuple[str, str], ...] = (
    ("attainment", "attain"),
    ("median_ttft_ms", "TTFT p50 ms"),
    ("p99_ttft_ms", "TTFT p99 ms"),
    ("median_tpot_ms", "TPOT p50 ms"),
    ("p99_tpot_ms", "TPOT p99 ms"),
    ("median_e2el_ms", "E2E p50 ms"),
    ("output_throughput", "out tok/s"),
    ("prefix_hit_rate", "prefix hit"),
    ("mean_load_imbalance", "imbalance"),
)
_PERCENT_KEYS = {"attainment", "prefix_hit_rate"}


def table(results: list[dict[str, Any]], title: str | None = None) -> Table:
    """One row per result dict (give one per (policy, router)), in input order."""
    t = Table(title=title)
    t.add_column("policy")
    t.add_column("router")
    t.add_column("goodput req/s", justify="right")
    for _, header in _COLUMNS:
        t.add_column(header, justify="right")
    for raw in results:
        row = _row_values(raw)
        cells = [str(row.get("policy", _DASH)), str(row.get("router", _DASH)), _goodput_cell(row)]
        for key, _ in _COLUMNS:
            v = row.get(key)
            if key in _PERCENT_KEYS:
                cells.append(_pct(v))
            elif key == "mean_load_imbalance":
                cells.append(_num(v, ".2f"))
            else:
                cells.append(_num(v, ".1f"))
        t.add_row(*cells)
    return t
