"""Where the shared workload traces are (data beside the repository, never copied in).

Looked for, in order: `$CPLANE_TRACES`, `../shared/traces` next to this
checkout, `/work/shared/traces`. A test that needs a trace and finds none is
skipped, naming where it looked: the traces are data the project reads by
path, not a part of the system (the simulator and its benchmarks also run on
synthetic workloads, and the tests that guard them fall back to one).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

AZURE = "AzureLLMInferenceTrace_conv.csv"
MOONCAKE = "mooncake_conversation_trace.jsonl"


def _dirs() -> list[Path]:
    env = os.environ.get("CPLANE_TRACES")
    return [Path(p) for p in (env,) if p] + [
        Path(__file__).resolve().parents[1].parent / "shared" / "traces",
        Path("/work/shared/traces"),
    ]


def find(name: str) -> Path | None:
    for d in _dirs():
        if (d / name).is_file():
            return d / name
    return None


def need(name: str) -> Path:
    """The trace's path, or skip the test with where it was looked for."""
    path = find(name)
    if path is None:
        pytest.skip(f"trace {name} not found in {', '.join(map(str, _dirs()))} "
                    "(set CPLANE_TRACES)")
    return path
