"""Background GPU sampling with pynvml: utilization and memory, summarized as mean / max.

Everything is None when there is no NVIDIA GPU (or no driver / pynvml): statistics then show
nulls, never zeros that look like measurements.
"""

from __future__ import annotations

import os
import threading
from typing import Optional


def _visible_indices(count: int) -> list[int]:
    """NVML indices of the GPUs this process may use (CUDA_VISIBLE_DEVICES when numeric)."""
    raw = os.environ.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return list(range(count))
    try:
        wanted = [int(x) for x in raw.split(",") if x.strip() != ""]
    except ValueError:       # GPU UUIDs: fall back to the first device
        return [0] if count else []
    return [i for i in wanted if 0 <= i < count]


class GpuMonitor:
    """with GpuMonitor(interval_s) as mon: ...; mon.summary() -> dict of GPU statistics."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self._nvml = None
        self._handles: list = []
        self.gpu_name: Optional[str] = None
        self._util: list[float] = []          # mean utilization (%) over visible GPUs, per sample
        self._mem: list[float] = []           # max memory used (bytes) over visible GPUs, per sample
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "GpuMonitor":
        try:
            import pynvml

            pynvml.nvmlInit()
            indices = _visible_indices(pynvml.nvmlDeviceGetCount())
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
            if not self._handles:
                pynvml.nvmlShutdown()
                return self
            name = pynvml.nvmlDeviceGetName(self._handles[0])
            self.gpu_name = name.decode() if isinstance(name, bytes) else str(name)
            self._nvml = pynvml
        except Exception:  # no library, no driver, no GPU: statistics stay null
            self._handles = []
            return self
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="llmbatch-gpu-monitor",
                                        daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        try:
            utils = [self._nvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self._handles]
            mems = [self._nvml.nvmlDeviceGetMemoryInfo(h).used for h in self._handles]
        except Exception:
            return
        self._util.append(sum(utils) / len(utils))
        self._mem.append(float(max(mems)))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
            self._nvml = None

    def __enter__(self) -> "GpuMonitor":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def summary(self) -> dict:
        def mean(xs):
            return sum(xs) / len(xs) if xs else None

        return {
            "gpu_name": self.gpu_name,
            "gpu_count": len(self._handles) or None,
            "gpu_util_mean": mean(self._util),
            "gpu_util_max": max(self._util) if self._util else None,
            "gpu_mem_used_mean_bytes": mean(self._mem),
            "gpu_mem_used_max_bytes": max(self._mem) if self._mem else None,
        }
