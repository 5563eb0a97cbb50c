"""attention/triton_kernels/rotary_decode.py's kernel specialisations for
bench/compile_kernels.py (EngineConfig.rotary_in_attention: decode and verify steps)."""

from __future__ import annotations

import importlib


def rotary_decode_variants():
    """attention/triton_kernels/rotary_decode.py (EngineConfig.rotary_in_attention): decode
    tilings (max_query_len 1: BLOCK_M = 16 rows for groups up to 16), unsplit and with
    batch 1's 16 splits (1B shape: 8 KV heads on 132 SMs), the split reduce in a second
    launch or fused; and the verify tilings paged_attention's variants have (k + 1 = 5..8
    tokens: 8 tokens x group 4 = 32 rows at batch 1's 16 splits, x group 8 = 64 rows at 2;
    verify spans of 2..4 tokens at group 4 reuse the decode tiling). Compiled like
    fused_rotary's kernels, without FMA contraction."""
    rd = importlib.import_module("llmbatch.runtime.attention.triton_kernels.rotary_decode")
    out = []
    for dt in ("bf16", "fp16", "fp32"):
        sig = {"out_ptr": f"*{dt}", "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32",
               "counter_ptr": "*i32", "q_ptr": f"*{dt}", "k_new_ptr": f"*{dt}",
               "v_new_ptr": f"*{dt}", "cos_ptr": f"*{dt}", "sin_ptr": f"*{dt}",
               "slot_ptr": "*i64", "k_cache_ptr": f"*{dt}", "v_cache_ptr": f"*{dt}",
               "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32",
               "query_start_loc_ptr": "*i32", "num_seqs": "i32", "num_heads": "i32",
               "scale_log2": "fp32"}
        for name in ("stride_q_tok", "stride_q_head", "stride_kn_tok", "stride_kn_head",
                     "stride_vn_tok", "stride_vn_head", "stride_cs_tok", "stride_o_tok",
                     "stride_o_head", "stride_k_blk", "stride_k_slot", "stride_k_head",
                     "stride_v_blk", "stride_v_slot", "stride_v_head", "stride_bt_seq",
                     "stride_bt_blk"):
            sig[name] = "i32"
        for head_dim in (64, 128):
            for group, block_q, block_m, splits, fused in (
                    (4, 4, 16, 1, False), (4, 4, 16, 16, False), (4, 4, 16, 16, True),
                    (8, 2, 16, 1, False), (1, 16, 16, 1, False),
                    (4, 8, 32, 16, False), (4, 8, 32, 16, True), (8, 8, 64, 2, False)):
                consts = {"GROUP": group, "BLOCK_Q": block_q, "BLOCK_M": block_m,
                          "HEAD_DIM": head_dim, "BLOCK_SIZE": 16, "TILE_N": 64,
                          "NUM_SPLITS": splits, "IEEE_DOT": dt == "fp32",
                          "FUSED_REDUCE": fused}
                sig_c = dict(sig, **{k: "constexpr" for k in consts})
                if splits == 1:   # out stands in for the partials
                    sig_c.update(part_out_ptr=f"*{dt}", part_lse_ptr=f"*{dt}")
                # Decode labels keep their old form (bench/kernel_variants.py's PDL list).
                bm = "" if block_m == 16 else f"bm{block_m} "
                out.append((f"rotary_decode {dt} hd{head_dim} g{group} bq{block_q} {bm}bs16 "
                            f"splits{splits}" + (" fused-reduce" if fused else ""),
                            rd._rotary_decode_kernel, sig_c, consts,
                            {"num_warps": 4, "num_stages": 2, "enable_fp_fusion": False}))
    return out
