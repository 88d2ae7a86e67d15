"""Chaos suite fixtures: a run directory kept after the run (logs of every process)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.procs import kill_survivors


@pytest.fixture
def chaos_dir(request: pytest.FixtureRequest) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="cplane-chaos-"))
    yield path
    left = kill_survivors()
    if left:
        print(f"\nchaos harness killed processes left running: {left}", flush=True)
    rep = getattr(request.node, "rep_call", None)
    if rep is None or rep.failed:
        print(f"\nchaos run dir (process logs, harness.log, report.txt): {path}", flush=True)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome: Any = yield
    rep = outcome.get_result()
    if rep.when == "call":
        item.rep_call = rep  # type: ignore[attr-defined]
