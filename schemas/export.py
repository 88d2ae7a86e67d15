"""JSON Schema export of the wire types (messages and admin), for clients in other languages."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec

from schemas.admin import ADMIN_TYPES
from schemas.batch import BATCH_TYPES
from schemas.control import CONTROL_TYPES
from schemas.messages import WIRE_TYPES

COMMITTED_DIR = Path(__file__).parent / "jsonschema"
EXPORTED_TYPES: dict[str, type[object]] = {**WIRE_TYPES, **ADMIN_TYPES, **CONTROL_TYPES,
                                           **BATCH_TYPES}


def schema_of(name: str) -> dict[str, object]:
    return msgspec.json.schema(EXPORTED_TYPES[name])


def render(name: str) -> str:
    """Stable text of one schema (sorted keys, trailing newline)."""
    return json.dumps(schema_of(name), indent=2, sort_keys=True) + "\n"


def write_all(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in EXPORTED_TYPES:
        path = out_dir / f"{name}.json"
        path.write_text(render(name), encoding="utf-8")
        written.append(path)
    return written
