"""A worker's Prometheus families: GPU gauges only where a GPU was read, and one
family per name for a process fronting several instances."""

from __future__ import annotations

from cplane.schemas.control import WorkerReport
from cplane.workers.metrics import GPU_FAMILIES, families, fleet_families


def names(reports: list[WorkerReport]) -> list[str]:
    return [f.name for f in fleet_families(reports)]


def test_gpu_gauges_only_when_a_gpu_was_read() -> None:
    bare = {f.name for f in families(WorkerReport(worker_id="w"))}
    assert not any("gpu" in n for n in bare)
    gpu = {f.name: f for f in families(WorkerReport(
        worker_id="w", gpu_util=0.0, gpu_mem_used_bytes=5, gpu_mem_total_bytes=10))}
    assert gpu["cplane_gpu_utilization"].samples[0].value == 0.0  # a real 0 stays
    assert gpu["cplane_gpu_memory_total_bytes"].samples[0].value == 10
    assert set(gpu) & GPU_FAMILIES == GPU_FAMILIES


def test_fleet_families_merge_instances_under_one_name() -> None:
    reports = [WorkerReport(worker_id="a", state="ready"),
               WorkerReport(worker_id="b", state="unhealthy")]
    merged = list(fleet_families(reports))
    assert len({f.name for f in merged}) == len(merged)  # each family once
    healthy = next(f for f in merged if f.name == "cplane_worker_healthy")
    assert {(s.labels["worker"], s.value) for s in healthy.samples} == {("a", 1.0), ("b", 0.0)}
    assert names(reports[:1]) == [f.name for f in families(reports[0])]
