"""layers/gemv.py's kernel specialisations for bench/compile_kernels.py: exactly those its
launchers produce (tests/test_compile_kernels_coverage.py records the launches of the engine,
bench_gemv_layouts and tests/gpu/test_gemv_gpu.py and checks each is listed here).

A specialisation is (dtype, prologue / epilogue flags, bias, tile config, PDL, weight prefetch
before the PDL wait: PREFETCH_W, gemv.set_weight_prefetch / prefetch=; L2 prefetch of the
weight slice before it: PREFETCH_L2, gemv.set_weight_prefetch_l2 / prefetch_l2=). Split 1 passes
`out` as the unused workspace and counter pointers (so they take the output's dtype); split-K
launches pass the float32 workspace and the int32 counters. Every pointer, N, K and
k_per_split is divisible by 16 at every launch listed (model and test dims are multiples of 16).

PREFETCH_L2 entries of the decoder layers have no recorded launch: the coverage test records
launches on CPU tensors, where gemv_linear never sets PREFETCH_L2 (inline PTX; the switch is
ignored off CUDA), except the LM head's, which it records as on CUDA. The test only requires
launched <= listed, so the layers' are listed from what the engine and tests/gpu would launch
on CUDA, and compiling them here is the only check that the inline asm is valid PTX.
"""

from __future__ import annotations

import importlib
import itertools

from bench.kernel_variants import _aligned

# "head": a plain call writing float32 logits (ParallelLMHead.gemv_logits: F32_OUT in bf16).
KINDS = {"plain": {}, "norm": dict(NORM=True), "residual": dict(RESIDUAL=True),
         "gate_up": dict(NORM=True, GATE_UP=True), "head": {}}
# Engine decode layers (models/llama_skinny.py with skinny_gemv), (N_w, K, kind): the 1B shape
# in bf16 (bench --skinny-gemv, with and without PDL; both again with the weight prefetch on,
# bench_batch1's prefetch row; with PDL, the L2 prefetch on with and without the weight
# prefetch: gemv.set_weight_prefetch_l2 on CUDA) and tests/gpu's tiny float32 Llama (hidden
# 128, 4 x 64 q heads, 2 kv heads, intermediate 256).
ENGINE_LAYERS = {"bf16": [(3072, 2048, "norm"), (2048, 2048, "residual"),
                          (16384, 2048, "gate_up"), (2048, 8192, "residual")],
                 "fp32": [(512, 128, "norm"), (128, 256, "residual"), (512, 128, "gate_up"),
                          (128, 256, "residual")]}
# The engines' LM heads (ParallelLMHead.use_gemv, set with the gemv layers), (vocab, hidden):
# one-row plain calls writing float32 logits (no norm / residual / bias, never PDL, the
# table's pick) with the weight prefetch of each EngineConfig.gemv_weight_prefetch mode (off, tile: PREFETCH_W, l2:
# PREFETCH_L2, both), since the head's launches read the same process-wide switches as the
# layers': the 1B head in bf16 in every mode, the tiny float32 one with the prefetch off.
ENGINE_HEADS = {"bf16": (128256, 2048), "fp32": (384, 128)}
# bench_gemv_layouts' five shapes (plain matmuls; gate_up is the merged weight).
BENCH_SHAPES = [(3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192), (128256, 2048)]


def launches():
    """(dtype, kind, bias, GemvConfig, pdl, prefetch, prefetch_l2) of every launch the engine,
    the bench and tests/gpu make, deduplicated."""
    gv = importlib.import_module("llmbatch.runtime.layers.gemv")
    from bench.bench_gemv_layouts import GEMV_CONFIGS

    out = []
    for dt, layers in ENGINE_LAYERS.items():
        on_off = (False, True) if dt == "bf16" else (False,)
        for (n_w, k, kind), pdl, prefetch in itertools.product(layers, on_off, on_off):
            out.append((dt, kind, False, gv.pick_config(n_w, k, kind == "gate_up"), pdl,
                        prefetch, False))
            if dt == "bf16" and pdl:                            # PREFETCH_L2: CUDA only
                out.append((dt, kind, False, gv.pick_config(n_w, k, kind == "gate_up"), pdl,
                            prefetch, True))
    for dt, (vocab, hidden) in ENGINE_HEADS.items():
        on_off = (False, True) if dt == "bf16" else (False,)
        for prefetch, prefetch_l2 in itertools.product(on_off, on_off):   # off/tile/l2/both
            out.append((dt, "head", False, gv.pick_config(vocab, hidden), False, prefetch,
                        prefetch_l2))
    for (n_w, k), cfg in itertools.product(BENCH_SHAPES, GEMV_CONFIGS.values()):
        out.append(("bf16", "plain", False, gv.GemvConfig(*cfg) if cfg
                    else gv.pick_config(n_w, k), False, False, False))
    # tests/gpu/test_gemv_gpu.py (K 2048, N_w 1536; the chain's down weight is 2048 x 768).
    splits = [gv.GemvConfig(block_n=16, block_k=512, split_k=s) for s in (1, 2, 4, 8)]
    for cfg in [None] + splits:
        for kind, bias in (("plain", True), ("norm", False), ("residual", False),
                           ("plain", False), ("gate_up", True)):
            pick = gv.pick_config(1536, 2048, kind == "gate_up")
            out.append(("bf16", kind, bias, cfg or pick, False, False, False))
    for s in (2, 4, 8):
        cfg = gv.GemvConfig(block_n=16, block_k=256, split_k=s)
        for kind, bias in (("norm", True), ("residual", False), ("gate_up", True)):
            out.append(("bf16", kind, bias, cfg, False, False, False))
    # The layer chain in a CUDA graph: split 4 with PDL on and off; with PDL on and prefetch,
    # L2 prefetch or both, at split 4 and at the table's pick (gate_up 1536 x 2048, down
    # 2048 x 768, norm).
    chain = gv.GemvConfig(block_n=16, block_k=512, split_k=4)
    for kind, bias in (("gate_up", True), ("residual", False), ("norm", False)):
        pick = gv.pick_config(1536, 2048, kind == "gate_up")
        out.append(("bf16", kind, bias, chain, False, False, False))
        for cfg, (prefetch, prefetch_l2) in itertools.product(
                (chain, pick), ((False, False), (True, False), (False, True), (True, True))):
            if cfg is chain or prefetch or prefetch_l2:
                out.append(("bf16", kind, bias, cfg, True, prefetch, prefetch_l2))
    return list(dict.fromkeys(out))


def rows_launches():
    """(dtype, kind, bias, GemvConfig, pdl, prefetch, prefetch_l2, ROWS) of the multi-row
    kernel's launches (gemv_linear with 2..8 rows, layers/gemv_rows.py): ROWS = M padded to 2,
    4 or 8. The engine's decoder layers of steps of 2..8 tokens (EngineConfig.gemv_max_rows)
    in ENGINE_LAYERS' shapes and switches (bf16: PDL x the weight prefetch, the L2 prefetch
    with PDL; the tiny float32 Llama plain), their LM heads (ParallelLMHead.gemv_max_rows) as
    ENGINE_HEADS' one-row calls, and bench_gemv_layouts' M = 5 cells (plain, the multi-row
    pick, ROWS = 8)."""
    gv = importlib.import_module("llmbatch.runtime.layers.gemv")
    out = []
    for rows, (dt, layers) in itertools.product((2, 4, 8), ENGINE_LAYERS.items()):
        on_off = (False, True) if dt == "bf16" else (False,)
        for (n_w, k, kind), pdl, prefetch in itertools.product(layers, on_off, on_off):
            cfg = gv.pick_config(n_w, k, kind == "gate_up", rows)
            out.append((dt, kind, False, cfg, pdl, prefetch, False, rows))
            if dt == "bf16" and pdl:                            # PREFETCH_L2: CUDA only
                out.append((dt, kind, False, cfg, pdl, prefetch, True, rows))
    for rows, (dt, (vocab, hidden)) in itertools.product((2, 4, 8), ENGINE_HEADS.items()):
        on_off = (False, True) if dt == "bf16" else (False,)     # the LM heads, as above
        for prefetch, prefetch_l2 in itertools.product(on_off, on_off):
            out.append((dt, "head", False, gv.pick_config(vocab, hidden, False, rows), False,
                        prefetch, prefetch_l2, rows))
    for n_w, k in BENCH_SHAPES:
        out.append(("bf16", "plain", False, gv.pick_config(n_w, k, False, 5), False, False,
                    False, 8))
    return list(dict.fromkeys(out))


def _variant(gv, dt, kind, bias, cfg, pdl, prefetch, prefetch_l2, rows):
    """One compile_kernels entry: the one-row kernel (rows 1) or the multi-row one (ROWS)."""
    split = cfg.split_k > 1
    sig = {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "bias_ptr": f"*{dt}",
           "norm_w_ptr": f"*{dt}", "res_ptr": f"*{dt}", "out_ptr": f"*{dt}",
           "ws_ptr": "*fp32" if split else f"*{dt}",
           "count_ptr": "*i32" if split else f"*{dt}"}
    if rows > 1:
        sig.update(M="i32", N="i32", K="i32", x_row_stride="i32", res_row_stride="i32")
    else:
        sig.update(N="i32", K="i32")
    sig.update(k_per_split="i32", eps="fp32")
    for name in ("HAS_BIAS", "NORM", "RESIDUAL", "GATE_UP", *(("ROWS",) if rows > 1 else ()),
                 "BLOCK_N", "BLOCK_K", "SPLIT_K", "NUM_STAGES", "USE_PDL", "PREFETCH_W",
                 "PREFETCH_L2", "F32_OUT"):
        sig[name] = "constexpr"
    f32_out = kind == "head" and dt != "fp32"   # ParallelLMHead.gemv_logits
    if f32_out:   # out, and the placeholders that point at it (res; ws / count unsplit)
        sig.update(out_ptr="*fp32", res_ptr="*fp32",
                   **({} if split else dict(ws_ptr="*fp32", count_ptr="*fp32")))
    consts = dict(dict(NORM=False, RESIDUAL=False, GATE_UP=False), **KINDS[kind],
                  HAS_BIAS=bias, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                  SPLIT_K=cfg.split_k, NUM_STAGES=cfg.num_stages, USE_PDL=pdl,
                  PREFETCH_W=prefetch, PREFETCH_L2=prefetch_l2, F32_OUT=f32_out,
                  **({"ROWS": rows} if rows > 1 else {}))
    return (f"gemv{f' rows{rows}' if rows > 1 else ''} {dt} {kind}{'+bias' if bias else ''} "
            f"n{cfg.block_n} k{cfg.block_k} w{cfg.num_warps} split{cfg.split_k} "
            f"p{cfg.num_stages}{' pdl' if pdl else ''}{' prefetch' if prefetch else ''}"
            f"{' l2prefetch' if prefetch_l2 else ''}",
            gv._gemv_kernel if rows == 1 else gv._gemv_rows_kernel, sig, consts,
            dict(num_warps=cfg.num_warps, **({"launch_pdl": True} if pdl else {})),
            _aligned(sig, ("N", "K", "k_per_split")))


def gemv_variants():
    """compile_kernels entries (label, kernel, signature, constexprs, options, attrs)."""
    gv = importlib.import_module("llmbatch.runtime.layers.gemv")
    return ([_variant(gv, *launch, 1) for launch in launches()]
            + [_variant(gv, *launch) for launch in rows_launches()])
