"""Batch-1 GEMV with the skinny path's fusions, in one launch (W-BATCH1; measured in stop 17).

    y[N] = prologue(x)[K] @ W[N, K]^T (+ bias[N]), then an optional epilogue;  x is one row

Same prologue / epilogues and the same rounding steps as layers/skinny_matmul.py (RMSNorm
prologue; residual and SiLU·mul epilogues), so models/llama_skinny.py can call either. Why a
second kernel: skinny_matmul pads every call to a 16-row tile (its batch invariance), which at
M = 1 wastes the FMA path's registers and puts 16x the products through tl.dot; stop 9's sweep
never got it past cuBLAS on qkv (9.5 vs 6.4 us) or gate_up (23.7 vs 18.1). Here x is a vector:
a program holds a (BLOCK_N, BLOCK_K) weight tile, multiplies it by x's chunk and keeps the
products in a float32 (BLOCK_N, BLOCK_K) accumulator, reduced over K once at the end. Weight
rows are K-contiguous, so each thread streams 16-byte vectors along K.

Split-K without a second launch (GemvConfig.split_k = S > 1): with N / BLOCK_N programs too few
to keep every SM streaming (o_proj: 2048 rows are 128 programs of 16 rows on a 132-SM H200),
program (n, s) covers the s-th K range and stores its float32 partial sums to a workspace
(S, N_w); then it counts itself in on an arrival counter of its column tile (atomic add,
acquire-release). The program that arrives last adds the S partials in split order 0..S-1 --
whatever order they arrived in, so the result is deterministic -- applies the epilogue and sets
the counter back to 0 for the next call (and the next CUDA-graph replay). That saves stop 13's
cuBLAS split-K reduce launch on down_proj (1.7 us + a ~1.1 us gap a layer) and the skinny path's
own reduce launch. Counters: an int32 tensor of at least cdiv(N, BLOCK_N) zeros that the caller
keeps (models/llama_skinny.py allocates one per model before capture); every call leaves it
all zero again.

Weight prefetch (EngineConfig.gemv_weight_prefetch "tile", the default with PDL since stop 19;
set_weight_prefetch or gemv_linear(prefetch=True)): with
PDL (runtime/pdl.py) a kernel of ours may be resident while the previous one runs, since ours
release their dependents at their start; but today its first load waits for griddepcontrol.wait.
W is written by no kernel of a decode step, so with PREFETCH_W a program loads its first weight
tile (both tiles for gate_up) before the wait, and the K loop's first iteration, peeled, uses
it: that tile's DRAM latency overlaps the previous kernel. Stop 17 measured the small matmuls at
~2 TB/s of the H200's 4.25 (qkv 12.6 MB in 5.7 us), much of it ramp-up; stop 19's
bench_batch1 measured the prefetch at 0.948 against 0.972 ms a batch-1 token (1.025x). Same
products added in the same order: bitwise equal to PREFETCH_W=False. Without PDL it only moves
the first load ahead of the norm prologue's pass.

L2 prefetch of the whole weight slice (opt-in; 0.90x at batch 1 in stop 19;
set_weight_prefetch_l2 or gemv_linear(prefetch_l2=True)): PREFETCH_W brings one tile a program;
with PREFETCH_L2 the program also asks L2 for every 128-byte line of its slice (BLOCK_N rows --
and the up rows -- x its K range) before the wait, so the rest of its stream may come from L2
instead of DRAM once the previous kernel is done. Inline PTX, so CUDA only: off CUDA the
launcher ignores it, and in the interpreter on CUDA tensors too. A hint to the cache: it changes
no value, with or without PREFETCH_W.

Not batch invariant with skinny_matmul (another summation order): M = 1 steps through here and
M > 1 steps through skinny_linear differ in float32 rounding, like any two GEMM kernels.

x of 2..GEMV_MAX_ROWS (8) rows (speculative verify steps): gemv_linear launches
layers/gemv_rows.py's kernel instead, which loads each weight tile once for all rows, with the
same prologue, epilogues, split-K, PDL and prefetches; M = 1 keeps the kernel below unchanged.

Runs on CUDA, or on CPU tensors under TRITON_INTERPRET=1 (tests; programs run one after
another there, so the last-arrival branch is exercised by the program of the last split).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from llmbatch.runtime.fp_fusion import FP_FUSION
# GemvConfig, pick_config and counter_tiles live in gemv_config.py; callers use them as gemv.*.
from llmbatch.runtime.layers.gemv_config import GemvConfig, counter_tiles, pick_config
from llmbatch.runtime.layers.skinny_checks import check_inputs
from llmbatch.runtime.layers.gemv_parts import (first_tiles, prefetch_l2_slice, store_out,
                                                x_chunk)
from llmbatch.runtime.layers.gemv_rows import GEMV_MAX_ROWS, _gemv_rows_kernel, rows_of
from llmbatch.runtime.layers.skinny_matmul import _split_k_range
from llmbatch.runtime.pdl import pdl_wait_then_release

# Weight prefetch before the PDL wait (PREFETCH_W), process-wide like runtime/pdl.py's switch:
# gemv_linear reads it at each launch (its prefetch= argument overrides it), so a CUDA graph
# keeps what it captured; EngineConfig.gemv_weight_prefetch sets it per engine (kernel_paths),
# bench_batch1's prefetch row flips it. Off here; kernel_paths turns it on per engine where
# the gemv layers and PDL are (auto since stop 19, measured 1.025x at batch 1 on an H200). From
# compiling for sm_90: the SASS issues the tile's LDG.128s before ACQBULK
# (griddepcontrol.wait); with stop 19's tile table (gemv_config) the 1B kernels take 80
# registers a thread (qkv, 8 x 512), 124-128 (o_proj, 4 stages), 96 (down, 8 x 1024) and 128
# (gate_up) with the prefetch; no spills.
_weight_prefetch = False


def set_weight_prefetch(on: bool) -> None:
    """Turn the first-weight-tile prefetch on or off for later gemv_linear launches
    (off until kernel_paths sets it per engine: see above). Harmless without PDL, and on CPU."""
    global _weight_prefetch
    _weight_prefetch = bool(on)


def weight_prefetch_enabled() -> bool:
    return _weight_prefetch


# L2 prefetch of the program's whole weight slice before the PDL wait (PREFETCH_L2): process-
# wide too, read at each launch (prefetch_l2= overrides it), default off. Opt-in: stop 19's
# bench_batch1 measured it 0.90x at batch 1 (1.077 against 0.972 ms) on an H200. A hint:
# gemv_linear never sets it off CUDA (the Triton interpreter cannot run inline PTX) nor on
# ROCm (no PTX), so CPU tests and engines see the switch ignored.
_weight_prefetch_l2 = False


def set_weight_prefetch_l2(on: bool) -> None:
    """Turn the L2 prefetch of each program's weight slice on or off for later gemv_linear
    launches (default off; opt-in, measured slower: see above). Ignored off CUDA."""
    global _weight_prefetch_l2
    _weight_prefetch_l2 = bool(on)


def weight_prefetch_l2_enabled() -> bool:
    return _weight_prefetch_l2


def set_prefetch_mode(mode: str) -> None:
    """Both switches from an EngineConfig.gemv_weight_prefetch mode: "off", "tile" (first
    tile), "l2" (slice into L2) or "both"."""
    set_weight_prefetch(mode in ("tile", "both"))
    set_weight_prefetch_l2(mode in ("l2", "both"))


def prefetch_mode() -> str:
    """The gemv_weight_prefetch mode the two switches are in now."""
    return {(False, False): "off", (True, False): "tile", (False, True): "l2",
            (True, True): "both"}[(_weight_prefetch, _weight_prefetch_l2)]


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, bias_ptr, norm_w_ptr, res_ptr, out_ptr, ws_ptr, count_ptr,
    N, K, k_per_split, eps,
    HAS_BIAS: tl.constexpr, NORM: tl.constexpr, RESIDUAL: tl.constexpr,
    GATE_UP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, NUM_STAGES: tl.constexpr, USE_PDL: tl.constexpr,
    PREFETCH_W: tl.constexpr, PREFETCH_L2: tl.constexpr, F32_OUT: tl.constexpr,
):
    # Program (n, s): output columns [n*BLOCK_N, (n+1)*BLOCK_N), K range
    # [s*k_per_split, (s+1)*k_per_split) (whole BLOCK_K chunks; the last may be short or empty).
    # With GATE_UP the up rows start N rows below the gate rows. ws: (SPLIT_K, N_w) fp32.
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    offs_k = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + cols[:, None].to(tl.int64) * K                  # (BLOCK_N, 1)
    if PREFETCH_W:
        # The first weight tile(s) of our K range, loaded BEFORE the PDL wait: no kernel of a
        # decode step writes W, so these loads may overlap the previous kernel (which released
        # us at its start); only W is read here -- x, the norm weights, the residual and every
        # store stay after the wait. k < k_hi is k < K for a non-empty range (k_per_split is
        # whole chunks) and masks everything for an empty last split. Names of their own (k_first,
        # not k): a name live before a loop and assigned in it becomes a loop-carried value.
        # Without PREFETCH_W the K range and the up rows stay after the wait, where they were:
        # that path compiles to the same PTX as before PREFETCH_W existed (checked, sm_90).
        k_lo, k_hi = _split_k_range(K, k_per_split, SPLIT_K)
        w_up_rows = w_ptr + (cols + N)[:, None].to(tl.int64) * K     # read only with GATE_UP
        k_first = k_lo + offs_k
        first_mask, w_first, w_up_first = first_tiles(w_rows, w_up_rows, col_mask, k_first,
                                                      k_hi, GATE_UP)
    if PREFETCH_L2:
        # The whole slice into L2 before the wait, after PREFETCH_W's demand loads (those are
        # needed first; their lines are asked for again here, one redundant request a thread).
        # Reads only W's addresses: nothing a previous kernel writes. Own names for the K range
        # (the same pure arithmetic as below, merged by the compiler), so PREFETCH_L2=False
        # leaves the rest of the kernel, and its PTX, as before.
        l2_lo, l2_hi = _split_k_range(K, k_per_split, SPLIT_K)
        prefetch_l2_slice(w_ptr, N, K, l2_lo, l2_hi, BLOCK_N, BLOCK_K, GATE_UP)
    if USE_PDL:
        pdl_wait_then_release()
    rstd = 0.0  # placeholder unless NORM
    if NORM:
        # The sum of squares over ALL of K in every program (x is K elements, L2-resident), so
        # every split normalizes with the same rstd.
        sq = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            xf = tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)
            sq += xf * xf
        rstd = tl.math.rsqrt(tl.sum(sq, axis=0) / K + eps)
    if not PREFETCH_W:
        k_lo, k_hi = _split_k_range(K, k_per_split, SPLIT_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_up = acc  # placeholder unless GATE_UP
    if GATE_UP:
        w_up_rows = w_ptr + (cols + N)[:, None].to(tl.int64) * K
        acc_up = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    k_start = k_lo
    if PREFETCH_W:
        # The loop's first iteration, peeled onto the prefetched tile(s): the same products
        # added to the same zero accumulators first, so the result is bitwise PREFETCH_W=False's
        # (an empty range adds 0 * 0).
        x_first = x_chunk(x_ptr, norm_w_ptr, k_first, first_mask, rstd, NORM)
        acc += w_first.to(tl.float32) * x_first
        if GATE_UP:
            acc_up += w_up_first.to(tl.float32) * x_first
        k_start = k_lo + BLOCK_K
    for k0 in tl.range(k_start, k_hi, BLOCK_K, num_stages=NUM_STAGES):
        k = k0 + offs_k
        k_mask = k < K
        xf = x_chunk(x_ptr, norm_w_ptr, k, k_mask, rstd, NORM)
        w_mask = col_mask[:, None] & k_mask[None, :]
        w = tl.load(w_rows + k[None, :], mask=w_mask, other=0.0)    # (BLOCK_N, BLOCK_K)
        acc += w.to(tl.float32) * xf
        if GATE_UP:
            w_up = tl.load(w_up_rows + k[None, :], mask=w_mask, other=0.0)
            acc_up += w_up.to(tl.float32) * xf
    part = tl.sum(acc, axis=1)                                       # (BLOCK_N,)
    part_up = part  # placeholder unless GATE_UP
    if GATE_UP:
        part_up = tl.sum(acc_up, axis=1)
    if SPLIT_K == 1:
        store_out(part, part_up, cols, col_mask, bias_ptr, res_ptr, out_ptr, w_ptr, N,
                  HAS_BIAS, RESIDUAL, GATE_UP, F32_OUT)
    else:
        n_w = 2 * N if GATE_UP else N
        tl.store(ws_ptr + tl.program_id(1) * n_w + cols, part, mask=col_mask)
        if GATE_UP:
            tl.store(ws_ptr + tl.program_id(1) * n_w + N + cols, part_up, mask=col_mask)
        # Every thread's partial-sum stores come before the arrival count (the barrier), and
        # the count releases them / acquires the other splits' (acq_rel, GPU scope).
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + pid, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            # Last to arrive: add the splits in fixed order. .cg reads from L2, where the other
            # SMs' stores are (this SM's L1 may hold nothing fresher, but never trust it).
            total = tl.zeros((BLOCK_N,), dtype=tl.float32)
            total_up = total
            for s in tl.static_range(SPLIT_K):
                total += tl.load(ws_ptr + s * n_w + cols, mask=col_mask, other=0.0,
                                 cache_modifier=".cg")
                if GATE_UP:
                    total_up += tl.load(ws_ptr + s * n_w + N + cols, mask=col_mask, other=0.0,
                                        cache_modifier=".cg")
            store_out(total, total_up, cols, col_mask, bias_ptr, res_ptr, out_ptr, w_ptr, N,
                      HAS_BIAS, RESIDUAL, GATE_UP, F32_OUT)
            tl.atomic_xchg(count_ptr + pid, 0)  # re-armed for the next call / graph replay


# triton.jit made _gemv_kernel an interpreter function (TRITON_INTERPRET=1 at import): that
# interpreter also takes CUDA tensors (it copies them to the host), but raises on inline asm.
_INTERPRETED = isinstance(_gemv_kernel, InterpretedFunction)


def _l2_prefetch_on(device: torch.device, prefetch_l2: Optional[bool]) -> bool:
    """PREFETCH_L2 of a launch: the keyword, else the switch, and only on CUDA (inline PTX: the
    interpreter cannot run it, ROCm cannot compile it), whatever either says."""
    want = weight_prefetch_l2_enabled() if prefetch_l2 is None else bool(prefetch_l2)
    return want and device.type == "cuda" and torch.version.hip is None


def gemv_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                *, norm_weight: Optional[torch.Tensor] = None, eps: float = 1e-6,
                residual: Optional[torch.Tensor] = None, gate_up: bool = False,
                counters: Optional[torch.Tensor] = None, config: Optional[GemvConfig] = None,
                pdl: bool = False, prefetch: Optional[bool] = None,
                prefetch_l2: Optional[bool] = None,
                out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """skinny_linear's contract for M rows, 1 <= M <= GEMV_MAX_ROWS (8): x (M, K), rows
    contiguous; weight (N_w, K) contiguous, same dtype; bias (N_w,); norm_weight (K,): RMSNorm
    prologue (each row its own rstd); residual (M, N): returns round(round(x @ W^T + bias) +
    residual); gate_up: N_w = 2I, returns silu(gate) * up (M, I). M = 1 runs the one-row
    kernel above; M > 1 layers/gemv_rows.py's (each weight tile loaded once for all rows; a
    row's result equals its one-row result to float32 rounding, not bitwise).
    counters: int32 zeros, >= counter_tiles(...) long, left all zero (split-K calls; None: a
    fresh zeros tensor per call, one more launch). config overrides the tile table. prefetch:
    load the first weight tile before the PDL wait (PREFETCH_W; None: weight_prefetch_enabled()
    at this launch); the result is bitwise the same either way. prefetch_l2: prefetch the
    program's whole weight slice into L2 before the PDL wait (PREFETCH_L2; None:
    weight_prefetch_l2_enabled()); a hint, ignored off CUDA; bitwise the same either way.
    out_dtype: float32 for a plain call (no residual, no gate_up) returns the output rounded
    to the weights' dtype and stored as float32, F.linear(...).float()'s values in one launch
    (the LM head's logits); None or x's dtype: the model dtype, as always."""
    if isinstance(x, torch.Tensor) and x.dim() == 2 and not 1 <= x.shape[0] <= GEMV_MAX_ROWS:
        raise ValueError(f"gemv_linear computes 1..{GEMV_MAX_ROWS} rows, got x of shape "
                         f"{tuple(x.shape)}")
    n = check_inputs(x, weight, bias, norm_weight, residual, gate_up)
    m = x.shape[0]
    if pdl and x.device.type != "cuda":
        raise ValueError(f"pdl=True needs CUDA tensors (programmatic dependent launch, sm_90+), "
                         f"got x on {x.device}")
    f32_out = out_dtype is not None and out_dtype != x.dtype
    if f32_out and (out_dtype != torch.float32 or residual is not None or gate_up):
        raise ValueError(f"gemv_linear: out_dtype={out_dtype} is float32 for a plain call (no "
                         f"residual, no gate_up) or x's dtype, got residual="
                         f"{residual is not None}, gate_up={gate_up}")
    k = x.shape[1]
    cfg = config or pick_config(weight.shape[0], k, gate_up, m)
    s = cfg.split_k
    out = torch.empty((m, n), dtype=torch.float32 if f32_out else x.dtype, device=x.device)
    ws = out  # placeholder pointer when s == 1
    if s > 1:
        tiles = counter_tiles(weight.shape[0], gate_up, cfg)
        if counters is None:
            counters = torch.zeros(tiles, dtype=torch.int32, device=x.device)
        elif (counters.dtype != torch.int32 or counters.device != x.device
              or counters.dim() != 1 or counters.numel() < tiles):
            raise ValueError(f"counters must be an int32 vector of >= {tiles} zeros on "
                             f"{x.device}, got {tuple(counters.shape)} {counters.dtype} on "
                             f"{counters.device}")
        # Partial sums (s, N_w) fp32; inside a CUDA graph capture this comes from the graph's
        # private pool like every activation.
        ws = torch.empty((s, m, weight.shape[0]) if m > 1 else (s, weight.shape[0]),
                         dtype=torch.float32, device=x.device)
    count = counters if s > 1 else out
    # K range per split: whole BLOCK_K chunks, so only the last split sees the K tail.
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.block_k), s) * cfg.block_k
    flags = dict(HAS_BIAS=bias is not None, NORM=norm_weight is not None,
                 RESIDUAL=residual is not None, GATE_UP=gate_up, USE_PDL=pdl,
                 PREFETCH_W=weight_prefetch_enabled() if prefetch is None else bool(prefetch),
                 # Never in the interpreter, even on CUDA tensors: it raises on inline asm.
                 PREFETCH_L2=_l2_prefetch_on(x.device, prefetch_l2) and not _INTERPRETED,
                 F32_OUT=f32_out)
    if pdl:
        flags["launch_pdl"] = True
    ptrs = (x, weight, bias if bias is not None else weight,
            norm_weight if norm_weight is not None else weight,
            residual if residual is not None else out, out, ws, count)
    tiles = dict(BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=s, NUM_STAGES=cfg.num_stages,
                 num_warps=cfg.num_warps)
    grid = (triton.cdiv(n, cfg.block_n), s)
    if m == 1:  # today's one-row kernel, arguments and specialisation as before M > 1 existed
        _gemv_kernel[grid](*ptrs, n, k, k_per_split, float(eps), **tiles, **FP_FUSION, **flags)
    else:
        res_stride = residual.stride(0) if residual is not None else n
        _gemv_rows_kernel[grid](*ptrs, m, n, k, x.stride(0), res_stride, k_per_split,
                                float(eps), ROWS=rows_of(m), **tiles, **FP_FUSION, **flags)
    return out
