"""FMA contraction of our Triton kernels, named at every launch (the launch option
enable_fp_fusion).

With fusion on, LLVM contracts a * b + c into one fused multiply-add: one rounding instead of
two, and fewer instructions. Triton 3.9 takes it on when a launch does not say
(TRITON_DEFAULT_FP_FUSION unset) but warns that Triton 3.10 turns that default off. Our
kernels were measured and tested with it on: the GPU tests' bitwise checks between paths (say
gemv against the LM head's check) hold for these roundings, and the timings for this code. So
every launch passes **FP_FUSION: the roundings and the timings stay as measured whatever the
installed Triton's default (TRITON_FORCE_DISABLE_FP_FUSION, a user's override, still wins); the
rotary kernels (layers/fused_rotary.py, attention/triton_kernels/rotary_decode.py) pass
enable_fp_fusion=False instead, to round as torch does (their docstrings say why).
bench/compile_kernels.py compiles every kernel with the option its launch passes, and
tests/runtime/test_fp_fusion.py checks each launch names it.
"""

from __future__ import annotations

from types import MappingProxyType

# Read-only: a launcher that mutated it would change every other kernel's code.
FP_FUSION = MappingProxyType({"enable_fp_fusion": True})
