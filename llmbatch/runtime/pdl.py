"""Programmatic dependent launch (PDL, sm_90+) for our Triton kernels (EngineConfig.pdl).

A kernel launched with PDL may be scheduled while the previous kernel in the stream drains; it
waits (griddepcontrol.wait) before its first load or store, so it never sees stale data. The
gain is the launch latency between kernels (~1 us each inside a decode CUDA graph, ~11 kernels
a layer at batch 1). The previous kernel is usually cuBLAS's, which does not release its
dependents early, so only the launch itself overlaps; measured by bench_batch1's row.

Process-wide, like torch.backends switches: kernel_paths sets it when an engine loads (on for
EngineConfig.pdl on sm_90+ CUDA, off otherwise), and launchers read it at each launch; graphs
keep what they captured. The Triton interpreter never sees it on (CPU engines turn it off).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_enabled = False


def set_enabled(on: bool) -> None:
    global _enabled
    _enabled = bool(on)


def enabled() -> bool:
    return _enabled


def launch_kwargs(device: torch.device) -> dict:
    """Extra launch arguments of a PDL-capable kernel on `device`: its USE_PDL constexpr and
    Triton's launch_pdl option when PDL is on and the device is CUDA; none otherwise."""
    if _enabled and device.type == "cuda":
        return {"USE_PDL": True, "launch_pdl": True}
    return {}


@triton.jit
def pdl_wait_then_release():
    """First statement of a PDL kernel (USE_PDL). griddepcontrol.wait blocks until the
    previous kernel has completed and its writes are visible, so it comes before the first load
    of anything a previous kernel wrote and before the first store (an output buffer may be
    memory the previous kernel still reads). Releasing our dependents at once lets the next
    launch get on the SMs as ours drain; it waits for our completion in turn."""
    tl.extra.cuda.gdc_wait()
    tl.extra.cuda.gdc_launch_dependents()
