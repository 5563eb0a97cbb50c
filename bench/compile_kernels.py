"""Compile every Triton kernel of llmbatch for a Hopper GPU, on a machine without one.

    python -m bench.compile_kernels [--arch 90] [--stage cubin]

The Triton interpreter (TRITON_INTERPRET=1, how the CPU tests run the kernels) executes the
Python body with numpy and never parses it, so it accepts code the real compiler rejects: loop
variables whose type changes, early returns in the wrong place, tl.dot shapes below 16, int64
versus int32 mix-ups. This script runs the real front end and back end (AST -> TTIR -> TTGIR ->
LLVM IR -> PTX -> cubin through the ptxas shipped in the triton wheel) for the exact
specialisations the runtime launches, so such errors show up before GPU time is spent.

Each kernel variant prints one line; exit status 1 if any failed. It must run WITHOUT
TRITON_INTERPRET (jit functions are then plain JITFunctions with an AST to compile).

Here: the CLI and the compile of each variant; which variants, in bench/kernel_variants.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

# _variants: tests/test_compile_kernels_coverage.py reads the list through this module.
from bench.kernel_variants import _variants

__all__ = ["main", "SHARED_LIMIT", "_variants"]

# Opt-in shared memory per block (bytes): Hopper 227 KB, A100 163 KB, sm_86 / sm_89 99 KB.
SHARED_LIMIT = {90: 227 << 10, 80: 163 << 10, 86: 99 << 10, 89: 99 << 10}


def _ptxas_usage(asm, arch: int) -> str:
    """' regs=R [SPILLS=stores/loadsB]' from ptxas -v on the variant's PTX, with the ptxas
    Triton uses. Spills (local memory: slower, not wrong) are reported, not failures."""
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(asm["ptx"])
        f.flush()
        log = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}"
                              f"{'a' if arch >= 90 else ''}", f.name, "-o", os.devnull],
                             capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    out = f" regs={regs.group(1) if regs else '?'}"
    if spill and spill.group(1) != "0":
        out += f" SPILLS={spill.group(1)}/{spill.group(2)}B"
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability (90 = Hopper)")
    p.add_argument("--stage", default="cubin", choices=("ttir", "ttgir", "llir", "ptx", "cubin"),
                   help="last stage that must succeed (cubin runs ptxas)")
    p.add_argument("--no-resources", dest="resources", action="store_false",
                   help="skip the registers / spills report (one more ptxas -v per variant)")
    p.add_argument("--filter", default="",
                   help="comma-separated substrings: only variants whose label contains one")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_kernels: unset TRITON_INTERPRET (the interpreter has no compiler)")
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    wanted = [f for f in args.filter.split(",") if f] or [""]
    variants = [v for v in _variants() if any(f in v[0] for f in wanted)]
    t0 = time.perf_counter()
    for label, fn, sig, consts, opts, *attrs in variants:
        try:
            # attrs (optional 6th element): argument specialisations such as tt.divisibility,
            # which real launches get from aligned pointers and sizes (they enable pipelining).
            compiled = triton.compile(ASTSource(fn, sig, consts, *attrs), target=target,
                                      options=opts)
            asm = compiled.asm
            if args.stage not in asm:
                raise RuntimeError(f"stage {args.stage} missing; have {sorted(asm)}")
            # metadata.shared: what the launch asks for; above the device's per-block opt-in
            # limit Triton refuses the launch (OutOfResources), so it fails here first.
            shared, limit = compiled.metadata.shared, SHARED_LIMIT.get(args.arch, 227 << 10)
            if shared > limit:
                raise RuntimeError(f"needs {shared} B of shared memory per block, sm_{args.arch} "
                                   f"allows {limit}")
            res = f"  smem={shared >> 10}K warps={opts.get('num_warps', 4)}"
            print(f"ok   {label}{res}{_ptxas_usage(asm, args.arch) if args.resources else ''}")
        except Exception as exc:  # report every variant, not just the first failure
            failures += 1
            msg = str(exc).strip().splitlines()
            print(f"FAIL {label}: {type(exc).__name__}: {' | '.join(msg[:6])}")
            if os.environ.get("COMPILE_KERNELS_TRACEBACK"):
                traceback.print_exc()
    print(f"compile_kernels: {len(variants) - failures}/{len(variants)} variants compiled for "
          f"sm_{args.arch} with triton {triton.__version__} in {time.perf_counter() - t0:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
