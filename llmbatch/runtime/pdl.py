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

from typing import Optional

import torch
import triton
import triton.language as tl

_enabled = False


def set_enabled(on: bool) -> None:
    global _enabled
    _enabled = bool(on)


def enabled() -> bool:
    return _enabled


def unavailable_reason(device: torch.device) -> Optional[str]:
    """Why our Triton kernels cannot launch with PDL on `device`, or None when they can
    (kernel_paths asks before turning the switch on): it needs sm_90+ (griddepcontrol) and a
    Triton with the launch_pdl option and gdc_wait / gdc_launch_dependents: pyproject allows
    triton>=3.0, and a Triton without them refuses the unknown launch_pdl keyword at every
    launch (a crash of the default config on an H100). An unanswering CUDA counts as no sm_90
    (the tests run kernel_paths' CUDA branch on CPU tensors)."""
    try:
        major = torch.cuda.get_device_capability(device)[0]
    except (AssertionError, RuntimeError):
        major = 0
    if major < 9:
        return "programmatic dependent launch needs sm_90 or newer"
    if not _triton_has_pdl():
        return ("this Triton cannot launch with programmatic dependent launch (no launch_pdl "
                "option or tl.extra.cuda.gdc_wait; a newer Triton has them)")
    return None


def _triton_has_pdl() -> bool:
    """The installed Triton's CUDA backend takes launch_pdl and has the griddepcontrol
    intrinsics pdl_wait_then_release compiles in."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    cuda = getattr(getattr(tl, "extra", None), "cuda", None)
    return (all(hasattr(cuda, f) for f in ("gdc_wait", "gdc_launch_dependents"))
            and "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {}))


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
