"""workers/gpu.py: which GPUs CUDA_VISIBLE_DEVICES names, how devices fold into one
reading, and absence (None, never 0) where NVML cannot answer."""

from __future__ import annotations

from pathlib import Path

import msgspec

from cplane.schemas.codec import encode
from cplane.schemas.settings import load_settings
from cplane.workers import gpu
from cplane.workers.engines.sim import SimEngine
from cplane.workers.gpu import DeviceReading, GpuProbe, GpuSample, combine, visible
from cplane.workers.runtime import Worker

GIB = 1 << 30
UUIDS = ["GPU-aaaa1111", "GPU-bbbb2222", "GPU-bbbb3333", "GPU-cccc4444"]


def test_utilisation_is_averaged_and_memory_summed() -> None:
    s = combine([DeviceReading(util=0.5, mem_used_bytes=10 * GIB, mem_total_bytes=80 * GIB),
                 DeviceReading(util=1.0, mem_used_bytes=30 * GIB, mem_total_bytes=80 * GIB)])
    assert s == GpuSample(util=0.75, mem_used_bytes=40 * GIB, mem_total_bytes=160 * GIB,
                          devices=2)


def test_a_device_without_a_utilisation_counter_still_counts_its_memory() -> None:
    """A MIG slice has memory but no utilisation: the mean is over those that have it."""
    s = combine([DeviceReading(util=0.2, mem_used_bytes=1, mem_total_bytes=4),
                 DeviceReading(mem_used_bytes=2, mem_total_bytes=4)])
    assert s is not None and s.util == 0.2 and (s.mem_used_bytes, s.mem_total_bytes) == (3, 8)
    only_memory = combine([DeviceReading(mem_used_bytes=2, mem_total_bytes=4)])
    assert only_memory is not None and only_memory.util is None


def test_nothing_read_is_absent_and_an_idle_gpu_is_zero() -> None:
    assert combine([]) is None
    assert combine([DeviceReading(), DeviceReading()]) is None
    idle = combine([DeviceReading(util=0.0, mem_used_bytes=0, mem_total_bytes=80 * GIB)])
    assert idle is not None and idle.util == 0.0 and idle.mem_used_bytes == 0


def test_cuda_visible_devices_is_read_as_cuda_reads_it() -> None:
    assert visible(None, UUIDS) == UUIDS  # unset: every GPU
    assert visible("", UUIDS) == []  # set and empty: none
    assert visible("-1", UUIDS) == []
    assert visible("2, 0", UUIDS) == [UUIDS[2], UUIDS[0]]  # CUDA's order is the list's
    assert visible("1,9,0", UUIDS) == [UUIDS[1]]  # the list ends at the first bad entry
    assert visible("0,0,3", UUIDS) == [UUIDS[0], UUIDS[3]]  # a device counts once
    assert visible("GPU-cccc,GPU-aaaa1111", UUIDS) == [UUIDS[3], UUIDS[0]]  # unique prefixes
    assert visible("GPU-bbbb,0", UUIDS) == []  # an ambiguous prefix names no device
    assert visible("MIG-1234abcd", UUIDS) == ["MIG-1234abcd"]


def test_no_nvml_is_absent_and_tried_once() -> None:
    tries = []

    def missing() -> object:
        tries.append(1)
        raise ImportError("No module named 'pynvml'")

    now = [0.0]
    probe = GpuProbe(env={}, load=missing, clock=lambda: now[0])
    assert probe.sample(1.0) is None
    now[0] = 0.5
    assert probe.sample(1.0) is None  # cached
    now[0] = 5.0
    assert probe.sample(1.0) is None  # read again: the failed start is remembered
    assert len(tries) == 1


def test_this_machine() -> None:
    """Without an NVIDIA driver (this CI) the process's probe says nothing at all; with
    one, a plausible reading."""
    s = gpu.sample(1.0)
    if not Path("/proc/driver/nvidia/version").exists():
        assert s is None
    elif s is not None:
        assert s.devices >= 1
        assert s.util is None or 0.0 <= s.util <= 1.0
        assert s.mem_total_bytes is None or 0 <= (s.mem_used_bytes or 0) <= s.mem_total_bytes


def test_heartbeat_of_an_engine_without_gpu_carries_no_gpu_fields() -> None:
    settings = load_settings(env={})
    worker = Worker(settings, SimEngine(settings.sim, model="sim"))
    hb = worker.heartbeat()
    assert (hb.gpu_util, hb.gpu_mem_used_bytes, hb.gpu_mem_total_bytes) == (None, None, None)
    wire = msgspec.json.decode(encode(hb))
    assert not any(k.startswith("gpu_") for k in wire)  # absent, not 0
