"""The chaos run: accepted requests under crashes, restarts and overload end in one terminal.

`CPLANE_CHAOS_REQUESTS` sets N (300 by default: the short run inside `make test`;
the acceptance check runs 2000). The last line printed is the figures line:

    chaos: accepted= refused= completed= errored= lost= dup_terminals= gaps=
           inconsistent= stranded= hung= max_rss_mb=

Other knobs (environment): CPLANE_CHAOS_WORKERS, _CAPACITY, _RATE, _REQ_MAX_MSGS,
_KILL_EVERY_S, _OVERLOAD_S, _DRAIN_S, _SEED.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from tests.chaos.scenario import ChaosConfig, run_chaos

_N = int(os.environ.get("CPLANE_CHAOS_REQUESTS", "300"))
# start-up + load at ~10 req/s + drain + books, with a wide margin
_TIMEOUT = int(300 + _N * 0.5)

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(_TIMEOUT)]

MUST_BE_ZERO = ("lost", "dup_terminals", "gaps", "inconsistent", "stranded", "hung")
# An errored request is acceptable only with one of these explicit codes.
ALLOWED_CODES = frozenset(os.environ.get(
    "CPLANE_CHAOS_ALLOWED_CODES", "worker_failed,overloaded,dead_letter,model_unavailable"
).split(","))


def test_chaos(chaos_dir: Path) -> None:
    cfg = ChaosConfig.from_env()
    out = asyncio.run(run_chaos(cfg, chaos_dir))
    fig = out.figures
    (chaos_dir / "report.txt").write_text("\n".join(out.report) + "\n")
    # the run's notes, then evidence of each nonzero figure (all of it in report.txt)
    for line in out.report[:90]:
        print(line, flush=True)
    line = fig.line()
    (chaos_dir / "figures.txt").write_text(line + "\n")
    target = os.environ.get("CPLANE_CHAOS_FIGURES")
    if target:
        Path(target).write_text(line + "\n")
    print(line, flush=True)
    bad = {k: getattr(fig, k) for k in MUST_BE_ZERO if getattr(fig, k)}
    figures = line.removeprefix("chaos: ")  # the figures line stays the last `chaos:` line
    assert not bad, f"guarantees broken {bad}: {figures} (run dir {chaos_dir})"
    odd = {c: n for c, n in fig.codes.items() if c not in ALLOWED_CODES}
    assert not odd, f"error codes outside {sorted(ALLOWED_CODES)}: {odd} ({chaos_dir})"
    assert fig.accepted >= cfg.requests, f"accepted < {cfg.requests}: {figures} ({chaos_dir})"
    shutil.rmtree(chaos_dir / "js", ignore_errors=True)  # keep the logs, drop the store
