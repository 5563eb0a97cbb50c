"""The skinny-matmul and int8 GEMM specialisations bench/compile_kernels.py compiles for sm_90:
exactly those the launchers produce (tests/test_compile_kernels_coverage.py records the launches
of the engine, bench and tests/gpu shapes and checks each is listed here).

Triton compiles one binary per (argument types, constexprs, ints equal to 1 -- made constexprs
--, ints and pointers divisible by 16, launch options), so a variant must match all of these:
a look-alike (say, unaligned where the launch is aligned) compiles other code, e.g. without the
async-copy pipeline, and proves nothing about shared memory or registers.
"""

from __future__ import annotations

import importlib

from bench.kernel_variants import _aligned, _pdl_option

# The prologue / epilogue combinations skinny_linear is launched with (gate_up always with the
# norm prologue, models/llama_skinny.py), each also with a bias (Qwen2 q/k/v, attention_bias).
SKINNY_KINDS = {"plain": {}, "norm": dict(NORM=True), "residual": dict(RESIDUAL=True),
                "gate_up": dict(NORM=True, GATE_UP=True)}
# (N, K) whose pick_config answer differs: BLOCK_K shrinks below 256 for small K (the tiny test
# models, hidden 64 / 128), and N past 32768 (the LM head) takes the wide tile.
SKINNY_NK = [(n, k) for n in (512, 128256) for k in (64, 128, 256, 2048)]


def skinny_configs(sm, torch_dt, bf16: bool) -> list:
    """Every SkinnyConfig launched in this dtype: pick_config's answers; in bf16 also the
    micro-benchmark's sweep (FMA, wider and split-K tiles) and tests/gpu's split 1/2/4/8."""
    from bench.bench_skinny_matmul import sweep_configs

    cfgs = [sm.pick_config(n, k, torch_dt) for n, k in SKINNY_NK]
    if bf16:
        cfgs += sweep_configs(sm, "qkv") + sweep_configs(sm, "down")
        cfgs += [sm.SkinnyConfig(block_n=16, block_k=256, num_stages=4, split_k=s)
                 for s in (1, 2, 4, 8)]
    return list(dict.fromkeys(cfgs))


def skinny_matmul_variants():
    """Both kernels of layers/skinny_matmul.py: dtype x kind (+ bias) x config, with and without
    USE_PDL (EngineConfig.pdl: the bf16 bench rows, the float32 engine GPU test; griddepcontrol
    needs sm_90, so this proves it lowers). M is never specialised (do_not_specialize); the
    pointers, N, K, k_per_split and row strides are divisible by 16 at every launch (model and
    test dims are multiples of 16). Split 1 passes `out` as the unused workspace pointer."""
    import torch

    sm = importlib.import_module("llmbatch.runtime.layers.skinny_matmul")
    out = []
    for dt, torch_dt in (("bf16", torch.bfloat16), ("fp16", torch.float16),
                         ("fp32", torch.float32)):
        sig = {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "bias_ptr": f"*{dt}",
               "norm_w_ptr": f"*{dt}", "res_ptr": f"*{dt}", "out_ptr": f"*{dt}",
               "ws_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "x_row_stride": "i32",
               "res_row_stride": "i32", "out_row_stride": "i32", "ws_row_stride": "i32",
               "ws_split_stride": "i32", "k_per_split": "i32", "eps": "fp32"}
        for name in ("HAS_BIAS", "NORM", "RESIDUAL", "GATE_UP", "BLOCK_M", "BLOCK_N",
                     "BLOCK_K", "DOT", "IEEE_DOT", "SPLIT_K", "USE_PDL"):
            sig[name] = "constexpr"
        cfgs = skinny_configs(sm, torch_dt, dt == "bf16")
        for cfg, (kind, flags), bias, pdl in _product(cfgs, SKINNY_KINDS.items(), (False, True),
                                                      (False, True) if dt != "fp16" else (False,)):
            consts = dict(dict(NORM=False, RESIDUAL=False, GATE_UP=False), **flags,
                          HAS_BIAS=bias, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                          BLOCK_K=cfg.block_k, DOT=cfg.dot, IEEE_DOT=dt == "fp32",
                          SPLIT_K=cfg.split_k, USE_PDL=pdl)
            out.append((f"skinny_matmul {dt} {kind}{'+bias' if bias else ''} n{cfg.block_n} "
                        f"k{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}"
                        f"{'' if cfg.dot else ' fma'} split{cfg.split_k}{' pdl' if pdl else ''}",
                        sm._skinny_matmul_kernel,
                        dict(sig, ws_ptr="*fp32" if cfg.split_k > 1 else f"*{dt}"), consts,
                        dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                             **_pdl_option(consts)),
                        _aligned(sig, ("N", "K", "k_per_split"))))
        # The reduce kernel: each epilogue (the norm is a prologue: same as plain), each split.
        sig = {"ws_ptr": "*fp32", "bias_ptr": f"*{dt}", "res_ptr": f"*{dt}", "out_ptr": f"*{dt}",
               "M": "i32", "N": "i32", "ws_row_stride": "i32", "ws_split_stride": "i32",
               "res_row_stride": "i32", "out_row_stride": "i32"}
        for name in ("HAS_BIAS", "RESIDUAL", "GATE_UP", "SPLIT_K", "BLOCK_M", "BLOCK_N",
                     "USE_PDL"):
            sig[name] = "constexpr"
        splits = sorted({c.split_k for c in cfgs if c.split_k > 1})
        kinds = [(k, f) for k, f in SKINNY_KINDS.items() if k != "norm"]
        for s, (kind, flags), bias, pdl in _product(splits, kinds, (False, True), (False, True)):
            consts = dict(HAS_BIAS=bias, RESIDUAL="RESIDUAL" in flags,
                          GATE_UP="GATE_UP" in flags, SPLIT_K=s, BLOCK_M=sm.MAX_M,
                          BLOCK_N=sm.REDUCE_BLOCK_N, USE_PDL=pdl)
            out.append((f"skinny_split_k_reduce {dt} {kind}{'+bias' if bias else ''} "
                        f"splits{s}{' pdl' if pdl else ''}", sm._split_k_reduce_kernel,
                        dict(sig), consts, dict(num_warps=4, **_pdl_option(consts)),
                        _aligned(sig, ("N",))))
    return out


def int8_matmul_variants():
    """layers/int8_matmul.py (w8a16 GEMM of int8 engines): every tile of its M table, each
    dtype, with and without bias, as launched: M = 1 is a constexpr (batch-1 decode, the
    decode tile only), M % 16 == 0 marked divisible or not; pointers always aligned; N, K and
    the strides divisible in every model but not in tests/gpu's 1500 x 1000 layer (bf16 and
    fp16 only: float32 int8 engines are not a GPU use)."""
    im = importlib.import_module("llmbatch.runtime.layers.int8_matmul")
    out = []
    for dt in ("bf16", "fp16", "fp32"):
        sig = {"x_ptr": f"*{dt}", "w_ptr": "*i8", "scale_ptr": "*fp32", "bias_ptr": f"*{dt}",
               "out_ptr": f"*{dt}", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32",
               "stride_wn": "i32", "stride_om": "i32"}
        for name in ("HAS_BIAS", "IEEE_DOT", "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"):
            sig[name] = "constexpr"
        for i, tile in enumerate(im.all_tiles()):
            m_kinds = ("m1", "m16x", "m") if i == 0 else ("m16x", "m")
            nk_kinds = ("nk16x", "nk") if dt != "fp32" else ("nk16x",)
            for has_bias, m_kind, nk in _product((False, True), m_kinds, nk_kinds):
                consts = dict(HAS_BIAS=has_bias, IEEE_DOT=dt == "fp32", BLOCK_M=tile.block_m,
                              BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, GROUP_M=im.GROUP_M)
                ints = (("M",) if m_kind == "m16x" else ()) + (
                    ("N", "K", "stride_xm", "stride_wn", "stride_om") if nk == "nk16x" else ())
                out.append((f"int8_matmul {dt} bm{tile.block_m} bn{tile.block_n} "
                            f"bk{tile.block_k} bias={has_bias} {m_kind} {nk}",
                            im._int8_matmul_kernel,
                            dict(sig, M="constexpr") if m_kind == "m1" else sig,
                            dict(consts, M=1) if m_kind == "m1" else consts,
                            {"num_warps": tile.num_warps, "num_stages": tile.num_stages},
                            _aligned(sig, ints)))
    return out


def _product(*iterables):
    import itertools

    return itertools.product(*(list(it) for it in iterables))
