"""Which Triton kernel specialisations bench/compile_kernels.py compiles for sm_90: exactly those
the runtime launches (tests/test_compile_kernels_coverage.py records the launches and checks).

_variants() lists them all as (label, jit function, signature, constexprs, options[, attrs]):
paged attention, split reduce, store_kv, RMSNorm, SiLU-and-mul, rotary (+ store_kv), the L2
touch, argmax and nf4_matmul here; the gemv, skinny-matmul / int8 GEMM and rotary-decode tables
come from bench/gemv_variants.py, bench/gemm_variants.py and bench/rotary_decode_variants.py.
_aligned and _pdl_option are the helpers every table uses. compile_kernels.py is the compiler
CLI (front end to cubin, shared-memory limit, ptxas register report).
"""

from __future__ import annotations

from llmbatch.runtime.fp_fusion import FP_FUSION


def _variants():
    """(label, jit function, signature, constexprs, options[, attrs]) for each launched
    specialisation.

    Signatures follow Triton's type strings: "*bf16" pointer, "i32"/"i64" ints, "fp32" floats.
    """
    import importlib

    # The package re-exports the launcher functions under the modules' names: import modules.
    pa = importlib.import_module("llmbatch.runtime.attention.triton_kernels.paged_attention")
    sk = importlib.import_module("llmbatch.runtime.attention.triton_kernels.store_kv")
    fk = importlib.import_module("llmbatch.runtime.layers.fused_kernels")
    fr = importlib.import_module("llmbatch.runtime.layers.fused_rotary")
    sm = importlib.import_module("llmbatch.runtime.layers.skinny_matmul")

    out = []
    for dt in ("bf16", "fp16", "fp32"):
        for head_dim in (64, 128):
            # (8, 32) and (8, 64) rows: k+1 <= 8 verify spans, split since stop 9.
            for group, block_q, block_m, splits in ((4, 4, 16, 1), (4, 16, 64, 1),
                                                    (8, 2, 16, 1), (8, 2, 16, 8),
                                                    (1, 16, 16, 1), (1, 64, 64, 1),
                                                    (4, 8, 32, 16), (8, 8, 64, 2)):
                for block_size in (16, 32):
                    sig = {
                        "out_ptr": f"*{dt}", "part_out_ptr": "*fp32" if splits > 1 else f"*{dt}",
                        "part_lse_ptr": "*fp32" if splits > 1 else f"*{dt}",
                        "counter_ptr": "*i32",   # seq_lens when not fused
                        "q_ptr": f"*{dt}", "k_cache_ptr": f"*{dt}", "v_cache_ptr": f"*{dt}",
                        "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32",
                        "query_start_loc_ptr": "*i32", "num_seqs": "i32", "num_heads": "i32",
                        "scale_log2": "fp32",
                        "stride_q_tok": "i32", "stride_q_head": "i32",
                        "stride_o_tok": "i32", "stride_o_head": "i32",
                        "stride_k_blk": "i32", "stride_k_slot": "i32", "stride_k_head": "i32",
                        "stride_v_blk": "i32", "stride_v_slot": "i32", "stride_v_head": "i32",
                        "stride_bt_seq": "i32", "stride_bt_blk": "i32",
                    }
                    consts = {"GROUP": group, "BLOCK_Q": block_q, "BLOCK_M": block_m,
                              "HEAD_DIM": head_dim, "BLOCK_SIZE": block_size, "TILE_N": 64,
                              "NUM_SPLITS": splits, "IEEE_DOT": dt == "fp32",
                              "FUSED_REDUCE": False}
                    for k in consts:
                        sig[k] = "constexpr"
                    warps = 8 if block_m * head_dim >= 128 * 128 else 4
                    out.append((f"paged_attention {dt} hd{head_dim} g{group} bq{block_q} "
                                f"bm{block_m} bs{block_size} splits{splits}",
                                pa._paged_attention_kernel, sig, consts,
                                {"num_warps": warps, "num_stages": 2}))
                    if splits > 1:   # TritonAttentionBackend(fused_split_reduce=True)
                        out.append((f"paged_attention {dt} hd{head_dim} g{group} bq{block_q} "
                                    f"bm{block_m} bs{block_size} splits{splits} fused-reduce",
                                    pa._paged_attention_kernel, sig,
                                    dict(consts, FUSED_REDUCE=True),
                                    {"num_warps": warps, "num_stages": 2}))
                    if head_dim == 64 and block_q * group == block_m or (group, block_q) == (4, 4):
                        # 128-key tiles: the default for wide decode batches at head_dim 64.
                        consts128 = dict(consts, TILE_N=128)
                        out.append((f"paged_attention {dt} hd{head_dim} g{group} bq{block_q} "
                                    f"bm{block_m} bs{block_size} splits{splits} tile128",
                                    pa._paged_attention_kernel, sig, consts128,
                                    {"num_warps": warps, "num_stages": 2}))
        for splits in (2, 16):
            sig = {"out_ptr": f"*{dt}", "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32",
                   "num_heads": "i32", "stride_o_tok": "i32", "stride_o_head": "i32",
                   "NUM_SPLITS": "constexpr", "SPLITS_PAD": "constexpr", "HEAD_DIM": "constexpr"}
            out.append((f"reduce_splits {dt} splits{splits}", pa._reduce_splits_kernel, sig,
                        {"NUM_SPLITS": splits, "SPLITS_PAD": splits, "HEAD_DIM": 64},
                        {"num_warps": 1}))
        for slot_t in ("i32", "i64"):
            sig = {"key_ptr": f"*{dt}", "value_ptr": f"*{dt}", "k_cache_ptr": f"*{dt}",
                   "v_cache_ptr": f"*{dt}", "slot_mapping_ptr": f"*{slot_t}",
                   "num_kv_heads": "i32",
                   "stride_key_tok": "i32", "stride_key_head": "i32",
                   "stride_value_tok": "i32", "stride_value_head": "i32",
                   "stride_kc_blk": "i32", "stride_kc_slot": "i32", "stride_kc_head": "i32",
                   "stride_vc_blk": "i32", "stride_vc_slot": "i32", "stride_vc_head": "i32",
                   "BLOCK_SIZE": "constexpr", "HEADS_PAD": "constexpr", "HEAD_DIM": "constexpr"}
            out.append((f"store_kv {dt} slots {slot_t}", sk._store_kv_kernel, sig,
                        {"BLOCK_SIZE": 16, "HEADS_PAD": 8, "HEAD_DIM": 64}, {"num_warps": 4}))
        for has_res in (False, True):
            sig = {"x_ptr": f"*{dt}", "res_ptr": f"*{dt}", "w_ptr": f"*{dt}", "out_ptr": f"*{dt}",
                   "res_out_ptr": f"*{dt}", "x_row_stride": "i32", "res_row_stride": "i32",
                   "out_row_stride": "i32", "res_out_row_stride": "i32", "hidden": "i32",
                   "eps": "fp32", "HAS_RESIDUAL": "constexpr", "BLOCK": "constexpr"}
            out.append((f"rms_norm {dt} residual={has_res}", fk._rms_norm_kernel, sig,
                        {"HAS_RESIDUAL": has_res, "BLOCK": 2048}, {"num_warps": 8}))
        sig = {"x_ptr": f"*{dt}", "out_ptr": f"*{dt}", "x_row_stride": "i32",
               "out_row_stride": "i32", "d": "i32", "BLOCK": "constexpr"}
        out.append((f"silu_and_mul {dt}", fk._silu_and_mul_kernel, sig, {"BLOCK": 1024},
                    {"num_warps": 4}))
        sig = {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "cos_ptr": f"*{dt}", "sin_ptr": f"*{dt}",
               "q_out_ptr": f"*{dt}", "k_out_ptr": f"*{dt}",
               "q_tok_stride": "i32", "q_head_stride": "i32", "k_tok_stride": "i32",
               "k_head_stride": "i32", "cs_tok_stride": "i32", "q_out_tok_stride": "i32",
               "q_out_head_stride": "i32", "k_out_tok_stride": "i32",
               "k_out_head_stride": "i32", "num_q_heads": "i32", "num_k_heads": "i32",
               "half": "i32", "Q_HEADS": "constexpr", "K_HEADS": "constexpr",
               "BLOCK": "constexpr"}
        for q_heads, k_heads, block, warps in ((32, 8, 32, 4), (4, 1, 64, 1)):
            out.append((f"rotary {dt} q{q_heads} k{k_heads} half{block}", fr._rotary_kernel,
                        sig, {"Q_HEADS": q_heads, "K_HEADS": k_heads, "BLOCK": block},
                        {"num_warps": warps, "enable_fp_fusion": False}))
        sig = {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "cos_ptr": f"*{dt}",
               "sin_ptr": f"*{dt}", "q_out_ptr": f"*{dt}", "k_cache_ptr": f"*{dt}",
               "v_cache_ptr": f"*{dt}", "slot_ptr": "*i64"}
        for name in ("q_tok_stride", "q_head_stride", "k_tok_stride", "k_head_stride",
                     "v_tok_stride", "v_head_stride", "cs_tok_stride", "q_out_tok_stride",
                     "q_out_head_stride", "kc_blk_stride", "kc_slot_stride", "kc_head_stride",
                     "vc_blk_stride", "vc_slot_stride", "vc_head_stride", "num_q_heads",
                     "num_k_heads", "half"):
            sig[name] = "i32"
        for name in ("BLOCK_SIZE", "Q_HEADS", "K_HEADS", "BLOCK"):
            sig[name] = "constexpr"
        for q_heads, k_heads, block, warps in ((32, 8, 32, 4), (4, 1, 64, 1)):
            out.append((f"rotary_store_kv {dt} q{q_heads} k{k_heads} half{block}",
                        fr._rotary_store_kv_kernel, sig,
                        {"BLOCK_SIZE": 16, "Q_HEADS": q_heads, "K_HEADS": k_heads,
                         "BLOCK": block}, {"num_warps": warps, "enable_fp_fusion": False}))
    lp = importlib.import_module("llmbatch.runtime.layers.l2_prefetch")
    sig = {"src_ptr": "*i32", "n_words": "i32", "flags_ptr": "*i32", "sentinel": "i32",
           "iters": "i32", "BLOCK": "constexpr"}
    # The 1B shape's qkv (768 blocks: 3 iterations) and o_proj (512: 2); both sizes % 16 == 0.
    out.append(("l2_touch", lp._l2_touch_kernel, sig, {"BLOCK": lp.BLOCK_WORDS},
                {"num_warps": 4}, _aligned(sig, ("n_words",))))
    ta = importlib.import_module("llmbatch.runtime.triton_argmax")
    # greedy_argmax.greedy_argmax on CUDA: float32 logits, Llama 3's 128256 columns (126 chunks).
    sig = {"logits_ptr": "*fp32", "row_stride": "i32", "vocab": "i32", "val_ptr": "*fp32",
           "idx_ptr": "*i32", "num_chunks": "i32", "CHUNK": "constexpr"}
    out.append(("argmax chunks", ta._chunk_argmax_kernel, sig, {"CHUNK": ta.CHUNK},
                {"num_warps": 4}, _aligned(sig, ("row_stride",))))
    sig = {"val_ptr": "*fp32", "idx_ptr": "*i32", "num_chunks": "i32", "out_ptr": "*i64",
           "CHUNKS_PAD": "constexpr"}
    out.append(("argmax pick", ta._pick_chunk_kernel, sig, {"CHUNKS_PAD": 128},
                {"num_warps": 4}, _aligned(sig, ())))
    out.extend(_rotary_decode_variants())
    out = _with_pdl_variants(out)
    out.extend(_skinny_matmul_variants(sm))
    out.extend(_gemv_variants())
    out.extend(_int8_matmul_variants())
    out.extend(_nf4_matmul_variants())
    # Every launch names enable_fp_fusion (runtime/fp_fusion.py): **FP_FUSION, except the
    # rotary kernels' False, which their variants say. Each variant compiles as it runs.
    for variant in out:
        for option, value in FP_FUSION.items():
            variant[4].setdefault(option, value)
    return out


def _rotary_decode_variants():
    from bench.rotary_decode_variants import rotary_decode_variants

    return rotary_decode_variants()


# bf16 variants also compiled with programmatic dependent launch (EngineConfig.pdl, sm_90+):
# the kernels of a batch-1 decode step.
_PDL_LABELS = ("rms_norm bf16", "silu_and_mul bf16", "rotary_store_kv bf16 q32 k8",
               "paged_attention bf16 hd64 g4 bq4 bm16 bs16 splits1",
               "paged_attention bf16 hd64 g8 bq2 bm16 bs16 splits8",
               "paged_attention bf16 hd64 g4 bq8 bm32 bs16 splits16", "reduce_splits bf16",
               "rotary_decode bf16 hd64 g4 bq4 bs16 splits",
               # a batch-1 verify step (k + 1 = 5 tokens) on the one-launch path since stop 22
               "rotary_decode bf16 hd64 g4 bq8 bm32 bs16 splits16")


def _with_pdl_variants(variants: list) -> list:
    """Kernels with a USE_PDL constexpr (runtime/pdl.py; default False, which real launches
    bind themselves) get it in their signature; the _PDL_LABELS ones once more with it on."""
    out = []
    for label, fn, sig, consts, opts, *attrs in variants:
        if "USE_PDL" not in [p.name for p in fn.params] or "USE_PDL" in sig:
            out.append((label, fn, sig, consts, opts, *attrs))
            continue
        sig = dict(sig, USE_PDL="constexpr")
        out.append((label, fn, sig, dict(consts, USE_PDL=False), opts, *attrs))
        if label.startswith(_PDL_LABELS):
            out.append((f"{label} pdl", fn, sig, dict(consts, USE_PDL=True),
                        dict(opts, launch_pdl=True), *attrs))
    return out


def _gemv_variants():
    from bench.gemv_variants import gemv_variants

    return gemv_variants()


def _int8_matmul_variants():
    from bench.gemm_variants import int8_matmul_variants

    return int8_matmul_variants()


def _skinny_matmul_variants(sm):
    """layers/skinny_matmul.py's two kernels, as launched (bench/gemm_variants.py)."""
    from bench.gemm_variants import skinny_matmul_variants

    return skinny_matmul_variants()


def _nf4_matmul_variants():
    """layers/nf4_matmul.py (w4a16 GEMM of nf4-quantized engines and their nf4 LM head): every
    tile of its M table, each activation dtype, with and without bias, specialised as launches
    are: M = 1 is a constexpr (batch-1 decode), M % 16 == 0 marked divisible or not; K (and so
    stride_xm = K) always divisible (the launcher requires K % 64 == 0), N and stride_om = N
    divisible in every real model but not in tests/gpu's 1500-wide layer. float32 engines
    (no GPU use in practice) only with the general M and aligned N."""
    import importlib

    nm = importlib.import_module("llmbatch.runtime.layers.nf4_matmul")
    im = importlib.import_module("llmbatch.runtime.layers.int8_matmul")
    out = []
    for dt in ("bf16", "fp16", "fp32"):
        sig = {"x_ptr": f"*{dt}", "w_ptr": "*u8", "absmax_ptr": "*fp32", "code_ptr": "*fp32",
               "bias_ptr": f"*{dt}", "out_ptr": f"*{dt}", "M": "i32", "N": "i32", "K": "i32",
               "stride_xm": "i32", "stride_om": "i32"}
        for name in ("HAS_BIAS", "IEEE_DOT", "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"):
            sig[name] = "constexpr"
        for i, tile in enumerate(nm.all_tiles()):
            m_kinds = ("m",) if dt == "fp32" else ("m1", "m16x", "m") if i == 0 else ("m16x", "m")
            for has_bias in (False, True):
                consts = dict(HAS_BIAS=has_bias, IEEE_DOT=dt == "fp32", BLOCK_M=tile.block_m,
                              BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, GROUP_M=im.GROUP_M)
                for m_kind in m_kinds:
                    for n_kind in ("n16x",) if dt == "fp32" else ("n16x", "n"):
                        ints = ("K", "stride_xm") + (("M",) if m_kind == "m16x" else ()) + (
                            ("N", "stride_om") if n_kind == "n16x" else ())
                        out.append((f"nf4_matmul {dt} bm{tile.block_m} bn{tile.block_n} "
                                    f"bk{tile.block_k} bias={has_bias} {m_kind} {n_kind}",
                                    nm._nf4_matmul_kernel,
                                    dict(sig, M="constexpr") if m_kind == "m1" else sig,
                                    dict(consts, M=1) if m_kind == "m1" else consts,
                                    {"num_warps": tile.num_warps,
                                     "num_stages": tile.num_stages}, _aligned(sig, ints)))
    return out


def _pdl_option(consts: dict) -> dict:
    """USE_PDL kernels launch with programmatic dependent launch (a compile option too)."""
    return {"launch_pdl": True} if consts["USE_PDL"] else {}


def _aligned(sig: dict, ints: tuple) -> dict:
    """tt.divisibility 16 on every pointer, row/split stride and the named int arguments."""
    names = list(sig)
    return {(names.index(a),): [["tt.divisibility", 16]] for a in names
            if a.endswith("_ptr") or a.endswith("_stride") or a in ints}
