"""JSON Schema export of the wire types (messages and admin), for clients in other languages."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import msgspec

from cplane.schemas.admin import ADMIN_TYPES
from cplane.schemas.batch import BATCH_TYPES
from cplane.schemas.control import CONTROL_TYPES
from cplane.schemas.messages import WIRE_TYPES

COMMITTED_DIR = Path(__file__).parent / "jsonschema"
EXPORTED_TYPES: dict[str, type[object]] = {**WIRE_TYPES, **ADMIN_TYPES, **CONTROL_TYPES,
                                           **BATCH_TYPES}


def schema_of(name: str) -> dict[str, object]:
    return _clean(msgspec.json.schema(EXPORTED_TYPES[name]))


def _clean(node: Any) -> Any:
    """Descriptions as `inspect.cleandoc` gives them: msgspec releases differ in how
    much of a docstring's indentation they keep, and the committed files must not."""
    if isinstance(node, dict):
        return {k: inspect.cleandoc(v) if k == "description" and isinstance(v, str)
                else _clean(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_clean(v) for v in node]
    return node


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
