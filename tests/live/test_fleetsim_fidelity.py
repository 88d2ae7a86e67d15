"""The fleet simulator against the live stack, on one small trace slice.

100 requests of the Azure conversation trace (rows 0-99, 2x the trace's rate:
about 13 s of arrivals, 4 requests/s per worker) go through a live stack
(nats-server, orchestrator and 2 sim workers at default cost, each its own
process) and through `fleetsim.simulate` with the same fleet; TTFT and E2E
p50/p90 are compared (bench/fidelity.py does both; ~30 s in all).

Tolerance: the median of the four |errors| at most 15 %. Measured on the
2-core development host (2026-11-29) after the simulator took pool work by
JetStream's pull order (the worker that took work longest ago) and the live
sim engine kept its own step clock: 2.4 % on this slice, 3.1 % for 500
requests on 4 workers (bench/fidelity.py). What is left is TTFT p90 on two
workers (-20 %: live pulls clump more when two workers race). 15 % leaves
room for a slower or busier machine and still fails when one side changes
what it models: a first token held back for a chunk, a messaging hop that
adds milliseconds, a dispatch rule only one side follows.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import fidelity
from cplane.fleetsim.records import TraceRequest
from cplane.fleetsim.synthetic import LengthDist, SyntheticSpec, generate
from cplane.fleetsim.workload import load_trace
from tests import traces


def workload() -> list[TraceRequest]:
    """The Azure conversation trace's first rows; without the trace, a synthetic
    workload of its shape (Poisson, its length means), so the guard always runs."""
    path = traces.find(traces.AZURE)
    if path is not None:
        return load_trace(path, limit=REQUESTS)
    return generate(SyntheticSpec(rate_per_s=5.5, count=REQUESTS, prompt=LengthDist(1155, 0.9, 4096),
                                  output=LengthDist(211, 0.8, 600)), seed=1)

REQUESTS, WORKERS, RATE_SCALE = 100, 2, 2.0
TOLERANCE_PCT = 15.0


@pytest.mark.slow  # a 100-request live stack of processes (about 30 s): `make test`, not test-fast
# Live TTFT is milliseconds: beside three other xdist workers on 2 cores it drifted
# 33-39 % from the simulator (CI, 2026-12-06), alone 2.4-2.6 %.
@pytest.mark.serial
@pytest.mark.timeout(150)
def test_simulator_tracks_the_live_stack(tmp_path: Path) -> None:
    reqs = fidelity.prepare(workload(), count=REQUESTS,
                            rate_scale=RATE_SCALE)
    res = fidelity.fidelity(reqs, workers=WORKERS, timeout_s=90, log_dir=tmp_path / "logs")
    table = "; ".join(
        f"{r['metric']} live {r['live_ms']:.1f} sim {r['sim_ms']:.1f} ({r['error_pct']:+.1f} %)"
        for r in res["rows"])
    print(f"fidelity: {table}; median |error| {res['median_abs_error_pct']:.1f} %")
    assert res["live_ok"] == REQUESTS, (res["live_errors"], tmp_path / "logs")
    assert res["sim_ok"] == REQUESTS
    assert res["median_abs_error_pct"] <= TOLERANCE_PCT, (
        f"simulator and live stack drifted apart: {table}; TTFT split p50 (live / sim) "
        f"{res['ttft_split_p50']}, TPOT p50 {res['tpot_p50_ms']}; logs in {tmp_path / 'logs'}")
