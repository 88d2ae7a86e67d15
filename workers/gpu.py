"""The GPUs this process sees, read from NVML, for the worker's heartbeat.

`sample(max_age_s)` returns one `GpuSample` (utilisation 0..1 averaged over
the visible GPUs, memory used and total summed over them) or None: no
`pynvml` (package nvidia-ml-py), no NVIDIA driver (every CPU machine), no
visible GPU, or every read failed. None means absent, never zero: the
heartbeat then carries no GPU fields at all.

Which GPUs: those `CUDA_VISIBLE_DEVICES` names, read as CUDA reads it
(comma-separated indices, `GPU-<uuid>` or a unique prefix of one,
`MIG-<uuid>`; the list ends at the first entry that names no device, so set
and empty means none), else every GPU NVML sees. An index is NVML's (PCI bus
order), which is CUDA's under `CUDA_DEVICE_ORDER=PCI_BUS_ID` (CUDA's default
orders by speed: alike on a machine of identical GPUs). NVML reads a whole
device, including other processes' use of it.

NVML is initialised once per process and a failed start is remembered (a
driver does not appear at run time). A sample is kept for `max_age_s`: the
heartbeat and the control report built beside it read the same one, and NVML
is asked at most once per heartbeat period however often either is built.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("cplane.worker.gpu")

# Engines that run on this process's GPUs. A worker fronting a server elsewhere
# (or the simulated engine) reports no GPU: the ones it could see are not its engine's.
GPU_ENGINES = frozenset({"vllm"})


@dataclass(frozen=True, slots=True)
class DeviceReading:
    """One device as NVML answered; None where that read failed (MIG slices have no
    utilisation counter)."""

    util: float | None = None  # 0..1 over NVML's last sample period
    mem_used_bytes: int | None = None
    mem_total_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class GpuSample:
    """The visible GPUs together; each field None when no device answered it."""

    util: float | None = None  # mean over the devices that report it, 0..1
    mem_used_bytes: int | None = None  # sums over the devices that report memory
    mem_total_bytes: int | None = None
    devices: int = 0


def combine(readings: Sequence[DeviceReading]) -> GpuSample | None:
    """Average the utilisation, sum the memory; None when nothing was read at all."""
    utils = [r.util for r in readings if r.util is not None]
    mems = [(r.mem_used_bytes, r.mem_total_bytes) for r in readings
            if r.mem_used_bytes is not None and r.mem_total_bytes is not None]
    if not utils and not mems:
        return None
    return GpuSample(
        util=min(1.0, max(0.0, sum(utils) / len(utils))) if utils else None,
        mem_used_bytes=sum(u for u, _ in mems) if mems else None,
        mem_total_bytes=sum(t for _, t in mems) if mems else None,
        devices=len(readings))


def visible(cuda_visible: str | None, uuids: Sequence[str]) -> list[str]:
    """The UUIDs (NVML's, in index order: `uuids`) that `CUDA_VISIBLE_DEVICES` names,
    each once; a `MIG-` entry is kept as given (NVML finds its handle by that UUID)."""
    if cuda_visible is None:
        return list(uuids)
    chosen: list[str] = []
    for raw in cuda_visible.split(","):
        entry = raw.strip()
        if entry.isdigit():
            found = uuids[int(entry)] if int(entry) < len(uuids) else None
        elif entry.startswith("GPU-"):
            matches = [u for u in uuids if u.startswith(entry)]
            found = matches[0] if len(matches) == 1 else None
        elif entry.startswith("MIG-"):
            found = entry
        else:
            found = None
        if found is None:  # CUDA ignores this entry and every one after it
            break
        if found not in chosen:
            chosen.append(found)
    return chosen


class GpuProbe:
    """NVML behind a cache. `load` returns the pynvml module or raises (tests pass a
    loader that fails); `clock` is monotonic seconds."""

    def __init__(self, env: Mapping[str, str] | None = None,
                 load: Callable[[], Any] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._env = os.environ if env is None else env
        self._load = load or _import_pynvml
        self._clock = clock
        self._lock = threading.Lock()  # NVML calls are blocking; keep one sampler at a time
        self._nvml: Any = None
        self._handles: list[Any] | None = None  # None: not started; []: nothing to read
        self._at: float | None = None
        self._last: GpuSample | None = None

    def sample(self, max_age_s: float) -> GpuSample | None:
        """The visible GPUs now, or as read within the last `max_age_s`."""
        with self._lock:
            now = self._clock()
            if self._at is not None and now - self._at < max_age_s:
                return self._last
            self._last = self._read()
            self._at = now
            return self._last

    def _start(self) -> list[Any]:
        try:
            nvml = self._load()
            nvml.nvmlInit()
        except Exception as exc:  # no package, no driver, no device: absent
            log.debug("no GPU readings: %s", exc)
            return []
        try:
            count = nvml.nvmlDeviceGetCount()
        except Exception as exc:
            log.warning("NVML started but cannot count its devices: %s", exc)
            return []
        # A device this process may not read (no permission, fallen off the bus) keeps
        # its index with no UUID, and is left out.
        uuids = [_uuid(nvml, i) for i in range(count)]
        handles = []
        for uuid in visible(self._env.get("CUDA_VISIBLE_DEVICES"), uuids):
            with contextlib.suppress(Exception):
                handles.append(nvml.nvmlDeviceGetHandleByUUID(uuid))
        self._nvml = nvml
        log.info("GPU readings from NVML: %d visible device(s)", len(handles))
        return handles

    def _read(self) -> GpuSample | None:
        if self._handles is None:
            self._handles = self._start()
        if not self._handles:
            return None
        return combine([_reading(self._nvml, h) for h in self._handles])


def _uuid(nvml: Any, index: int) -> str:
    try:
        return str(nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(index)))
    except Exception:
        return ""


def _reading(nvml: Any, handle: Any) -> DeviceReading:
    util = used = total = None
    with contextlib.suppress(Exception):  # NotSupported on a MIG slice; a lost device
        util = nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0
    with contextlib.suppress(Exception):
        mem = nvml.nvmlDeviceGetMemoryInfo(handle)
        used, total = int(mem.used), int(mem.total)
    return DeviceReading(util=util, mem_used_bytes=used, mem_total_bytes=total)


def _import_pynvml() -> Any:
    import pynvml

    return pynvml


_PROBE = GpuProbe()


def sample(max_age_s: float) -> GpuSample | None:
    """This process's GPUs (one probe per process: every worker in it shares them)."""
    return _PROBE.sample(max_age_s)


__all__ = ["GPU_ENGINES", "DeviceReading", "GpuProbe", "GpuSample", "combine", "sample",
           "visible"]
