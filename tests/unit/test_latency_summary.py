"""LatencySummary (client/aggregate.py): p50 / p90 / p95 / p99 from samples, or from the
histogram's buckets when no samples came (pure)."""

from __future__ import annotations

import pytest

from cplane.client.aggregate import latency
from cplane.schemas.control import HistogramData


def test_percentiles_from_samples_include_p95() -> None:
    samples = [float(i) for i in range(1, 101)]  # 1..100 ms
    h = HistogramData(bounds=[1.0], counts=[100, 0], sum=5.05, count=100)
    s = latency(h, samples)
    assert s.count == 100 and s.mean_ms == pytest.approx(50.5)
    assert s.p50_ms <= s.p90_ms <= s.p95_ms <= s.p99_ms
    assert 94.0 <= s.p95_ms <= 96.0


def test_percentiles_from_buckets_include_p95() -> None:
    # 100 requests: 90 under 10 ms, 10 between 10 and 20 ms (seconds in the buckets)
    h = HistogramData(bounds=[0.01, 0.02], counts=[90, 10, 0], sum=0.9, count=100)
    s = latency(h, [])
    assert s.p90_ms == pytest.approx(10.0)
    assert s.p95_ms == pytest.approx(15.0)  # halfway through the second bucket
    assert s.p99_ms == pytest.approx(19.0)
