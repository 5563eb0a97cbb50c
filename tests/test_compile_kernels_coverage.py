"""bench/compile_kernels.py must compile the specialisations the GPU run will launch, not look-
alikes: Triton compiles one binary per (argument types, constexprs, integer args equal to 1 --
made constexprs --, ints and pointers divisible by 16, launch options). Here the launchers of
layers/skinny_matmul.py and layers/int8_matmul.py run on CPU tensors with their kernels replaced
by recorders that compute that key as Triton's own specialiser does; every recorded key must be
one of compile_kernels' variants. The shapes are those tests/gpu, the engine and the bench
launch (1B bf16, the tiny float32 / bfloat16 test models, the GPU tests' odd sizes). The launch
options in that key include enable_fp_fusion; for every other kernel, fp_fusion_mismatch checks
each variant's enable_fp_fusion against what tests/runtime/test_fp_fusion.py requires of its
launches (True; False for the rotary kernels) and that every kernel has a variant.
No compilation (a few seconds); compile_kernels itself is run by tests/test_bench_runs.py.
The check runs in a subprocess: the test session imports the kernels under TRITON_INTERPRET,
which replaces the JIT objects this needs."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEFAULT_OPTS = {"num_warps": 4, "num_stages": 3, "launch_pdl": False}


def _opts_key(opts: dict) -> tuple:
    return tuple(sorted({**DEFAULT_OPTS, **opts}.items()))


def launch_key(fn, args, kwargs) -> tuple:
    """(kernel, arg types, constexprs, divisible-by-16 args, options) of one launch."""
    from triton.backends.nvidia import compiler as nvidia
    from triton.runtime import jit

    names = [p.name for p in fn.params]
    bound = dict(zip(names, args), **{k: v for k, v in kwargs.items() if k in names})
    types, consts, div = {}, {}, set()
    for p in fn.params:
        v = bound[p.name]
        if p.is_constexpr:
            consts[p.name] = v
            continue
        ty, attr = jit.native_specialize_impl(nvidia.CUDABackend, v, False,
                                              not p.do_not_specialize,
                                              not p.do_not_specialize_on_alignment)
        if ty == "constexpr":  # an int equal to 1
            consts[p.name] = attr
        else:
            types[p.name] = ty
            if attr == "D":
                div.add(p.name)
    return (fn.fn.__name__, tuple(sorted(types.items())), tuple(sorted(consts.items())),
            frozenset(div), _opts_key({k: v for k, v in kwargs.items() if k not in names}))


def variant_key(variant) -> tuple:
    _, fn, sig, consts, opts, *attrs = variant
    names = list(sig)
    div = {names[i] for (i,) in (attrs[0] if attrs else {})}
    types = {n: t for n, t in sig.items() if t != "constexpr"}
    return (fn.fn.__name__, tuple(sorted(types.items())), tuple(sorted(consts.items())),
            frozenset(div), _opts_key(opts))


class Recorder:
    """Stands in for a JITFunction: kernel[grid](*args, **kwargs) records the launch key."""

    def __init__(self, fn, keys: set, pdl: list):
        self.fn, self.keys, self.pdl = fn, keys, pdl

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if self.pdl[0] and "USE_PDL" in kwargs:  # pdl=True refuses CPU tensors: as it sets
                kwargs = dict(kwargs, USE_PDL=True, launch_pdl=True)
            self.keys.add(launch_key(self.fn, args, kwargs))
        return launch


def recorded():
    """Replaces the kernels by Recorders (for good: this runs in its own process)."""
    keys, pdl = set(), [False]
    for mod, name in ((sm, "_skinny_matmul_kernel"), (sm, "_split_k_reduce_kernel"),
                      (im, "_int8_matmul_kernel"), (gv, "_gemv_kernel"),
                      (gv, "_gemv_rows_kernel")):
        setattr(mod, name, Recorder(getattr(mod, name), keys, pdl))
    return keys, pdl


def _skinny_layer(dtype, hidden, q, kv, inter, ms, cfgs=(None,), bias=False):
    """Every skinny launch of a decoder layer (llama_skinny.skinny_layer_forward)."""
    z = lambda *s: torch.zeros(*s, dtype=dtype)  # noqa: E731
    w_qkv, w_o, w_gu, w_d = z(q + 2 * kv, hidden), z(hidden, q), z(2 * inter, hidden), \
        z(hidden, inter)
    for m in ms:
        for cfg in cfgs:
            sm.skinny_linear(z(m, hidden), w_qkv, z(q + 2 * kv) if bias else None,
                             norm_weight=z(hidden), config=cfg)
            sm.skinny_linear(z(m, q), w_o, residual=z(m, hidden), config=cfg)
            sm.skinny_linear(z(m, hidden), w_gu, norm_weight=z(hidden), gate_up=True, config=cfg)
            sm.skinny_linear(z(m, inter), w_d, residual=z(m, hidden), config=cfg)


def skinny_missing(recorded) -> str:
    from bench.bench_skinny_matmul import sweep_configs

    keys, pdl = recorded
    for pdl[0] in (False, True):
        # Engine GPU tests: tiny float32 Llama (hidden 128, 4 x 64 q heads, 2 kv heads).
        _skinny_layer(torch.float32, 128, 256, 128, 256, range(1, 9))
        # bench.run --skinny / --pdl: Llama-3.2-1B in bf16.
        _skinny_layer(torch.bfloat16, 2048, 2048, 512, 8192, range(1, 17))
    # bench_skinny_matmul's sweep (1B bf16, pdl on and off) and the LM head.
    for pdl[0] in (False, True):
        for m in (1, 16):
            for name in ("qkv", "o_proj", "down"):
                _skinny_layer(torch.bfloat16, 2048, 2048, 512, 8192, [m],
                              cfgs=sweep_configs(sm, name))
            sm.skinny_linear(torch.zeros(m, 2048, dtype=torch.bfloat16),
                             torch.zeros(128256, 2048, dtype=torch.bfloat16))
    pdl[0] = False
    # tests/gpu/test_skinny_matmul_gpu.py: K 2048, N 1536, I 768, bf16, every option.
    b16 = lambda *s: torch.zeros(*s, dtype=torch.bfloat16)  # noqa: E731
    w, b, nw = b16(1536, 2048), b16(1536), b16(2048)
    for cfg in (None, sm.SkinnyConfig(block_n=16, block_k=32, num_stages=3, dot=False),
                *(sm.SkinnyConfig(block_n=16, block_k=256, num_stages=4, split_k=s)
                  for s in (1, 2, 4, 8))):
        for pdl[0] in (False, True):
            for m in (1, 7, 16):
                x = b16(m, 2048)
                sm.skinny_linear(x, w, b, config=cfg)
                sm.skinny_linear(x, w, norm_weight=nw, config=cfg)
                sm.skinny_linear(x, w, b, norm_weight=nw, config=cfg)
                sm.skinny_linear(x, w, residual=b16(m, 1536), config=cfg)
                sm.skinny_linear(x, w, norm_weight=nw, gate_up=True, config=cfg)
                sm.skinny_linear(x, w, b, norm_weight=nw, gate_up=True, config=cfg)
                sm.skinny_linear(b16(m, 768), b16(2048, 768), residual=x, config=cfg)
    variants = {variant_key(v) for v in ck._variants() if v[0].startswith("skinny")}
    missing = {key for key in keys if key[0] in {v[0] for v in variants}} - variants
    return (f"{len(missing)} of {len(keys)} launched skinny specialisations are not compiled "
            f"by bench/compile_kernels.py, e.g. {sorted(missing, key=str)[:2]}"
            if missing else "")


def _gemv_layer(dtype, hidden, q, kv, inter, bias=False, m=1):
    """Every gemv launch of an m-token decoder layer (llama_skinny with skinny_gemv; m > 1:
    EngineConfig.gemv_max_rows)."""
    z = lambda *s: torch.zeros(*s, dtype=dtype)  # noqa: E731
    c = torch.zeros(4096, dtype=torch.int32)
    gv.gemv_linear(z(m, hidden), z(q + 2 * kv, hidden), z(q + 2 * kv) if bias else None,
                   norm_weight=z(hidden), counters=c)
    gv.gemv_linear(z(m, q), z(hidden, q), residual=z(m, hidden), counters=c)
    gv.gemv_linear(z(m, hidden), z(2 * inter, hidden), norm_weight=z(hidden), gate_up=True,
                   counters=c)
    gv.gemv_linear(z(m, inter), z(hidden, inter), residual=z(m, hidden), counters=c)


def _lm_head_launches() -> None:
    """The LM head's calls of 1..8 rows (ParallelLMHead.use_gemv, gemv_max_rows: no norm,
    residual, PDL or counters) with the switches of each gemv_weight_prefetch mode, as
    kernel_paths sets them: the 1B head in bf16 in every mode (bench.run --gemv-prefetch /
    --gemv-prefetch-l2, bench_batch1's prefetch rows and their combination), the tiny float32
    head of tests/gpu's engine test (vocab 384, hidden 128) with the prefetch off; more than
    one row with EngineConfig.gemv_max_rows (the multi-row kernel). gemv_linear sets PREFETCH_L2
    only on CUDA tensors: here the launch takes the switch as on CUDA (the recorder never runs
    the kernel), so the L2 entries are checked too."""
    from llmbatch.runtime.layers.embedding import ParallelLMHead

    gv._l2_prefetch_on = lambda device, prefetch_l2: (gv.weight_prefetch_l2_enabled()
                                                      if prefetch_l2 is None else prefetch_l2)
    every = ("off", "tile", "l2", "both")
    for vocab, hidden, dtype, modes in ((128256, 2048, torch.bfloat16, every),
                                        (384, 128, torch.float32, ("off",))):
        head = ParallelLMHead(vocab, hidden, params_dtype=dtype)
        head.use_gemv, head.gemv_max_rows = True, 8            # EngineConfig.gemv_max_rows
        for mode, m in itertools.product(modes, range(1, 9)):
            gv.set_prefetch_mode(mode)
            head(torch.zeros(m, hidden, dtype=dtype))
    gv.set_prefetch_mode("off")


def gemv_missing(recorded) -> str:
    from bench.bench_gemv_layouts import GEMV_CONFIGS, _gemv_call

    keys, pdl = recorded
    b16 = lambda *s: torch.zeros(*s, dtype=torch.bfloat16)  # noqa: E731
    for gv_prefetch in (False, True):                          # bench_batch1's prefetch row
        gv.set_weight_prefetch(gv_prefetch)
        for pdl[0], m in itertools.product((False, True), range(1, 9)):
            # bench.run --skinny-gemv, 1B; m > 1: steps of m tokens (gemv_max_rows)
            _gemv_layer(torch.bfloat16, 2048, 2048, 512, 8192, m=m)
    gv.set_weight_prefetch(False)
    pdl[0] = False
    for m in range(1, 9):
        _gemv_layer(torch.float32, 128, 256, 128, 256, m=m)    # tests/gpu engine test
    c = torch.zeros(1 << 15, dtype=torch.int32)
    for n_w in (3072, 2048, 16384, 128256):                    # bench_gemv_layouts
        for cfg in GEMV_CONFIGS.values():
            _gemv_call(b16(1, 2048), b16(n_w, 2048), c, cfg)
    for cfg in GEMV_CONFIGS.values():
        _gemv_call(b16(1, 8192), b16(2048, 8192), c, cfg)
    for n_w, k in ((3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192), (128256, 2048)):
        _gemv_call(b16(5, k), b16(n_w, k), c, None)            # its M = 5 cells
    # tests/gpu/test_gemv_gpu.py: K 2048, N_w 1536, every option, its configs.
    x, w, b, nw, r = b16(1, 2048), b16(1536, 2048), b16(1536), b16(2048), b16(1, 1536)
    splits = [gv.GemvConfig(block_n=16, block_k=512, split_k=s) for s in (1, 2, 4, 8)]
    for cfg in [None] + splits:
        gv.gemv_linear(x, w, b, config=cfg, counters=c)
        gv.gemv_linear(x, w, norm_weight=nw, config=cfg, counters=c)
        gv.gemv_linear(x, w, residual=r, config=cfg, counters=c)
        gv.gemv_linear(x, w, config=cfg, counters=c)
        gv.gemv_linear(x, w, b, norm_weight=nw, gate_up=True, config=cfg, counters=c)
    for s in (2, 4, 8):
        cfg = gv.GemvConfig(block_n=16, block_k=256, split_k=s)
        gv.gemv_linear(x, w, b, norm_weight=nw, config=cfg, counters=c)
        gv.gemv_linear(x, w, residual=r, config=cfg, counters=c)
        gv.gemv_linear(x, w, b, norm_weight=nw, gate_up=True, config=cfg, counters=c)
    chain = gv.GemvConfig(block_n=16, block_k=512, split_k=4)
    for pdl[0] in (False, True):
        gv.gemv_linear(x, w, b, norm_weight=nw, gate_up=True, config=chain, counters=c)
        gv.gemv_linear(b16(1, 768), b16(2048, 768), residual=x, config=chain, counters=c)
        gv.gemv_linear(x, w, norm_weight=nw, config=chain, counters=c)
    pdl[0] = True
    for cfg in (chain, None):                                  # the chain with the prefetch on
        gv.gemv_linear(x, w, b, norm_weight=nw, gate_up=True, config=cfg, counters=c,
                       prefetch=True)
        gv.gemv_linear(b16(1, 768), b16(2048, 768), residual=x, config=cfg, counters=c,
                       prefetch=True)
        gv.gemv_linear(x, w, norm_weight=nw, config=cfg, counters=c, prefetch=True)
    pdl[0] = False
    _lm_head_launches()
    variants = {variant_key(v) for v in ck._variants() if v[0].startswith("gemv")}
    missing = {key for key in keys if key[0] in ("_gemv_kernel", "_gemv_rows_kernel")} - variants
    return (f"{len(missing)} launched gemv specialisations are not compiled by "
            f"bench/compile_kernels.py, e.g. {sorted(missing, key=str)[:2]}" if missing else "")


def int8_missing(recorded) -> str:
    keys, _ = recorded
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        # Model shapes (1B, tiny test models), decode and prefill row counts per tile bucket.
        for n, k in ((3072, 2048), (16384, 2048), (2048, 8192), (512, 128), (128, 256)):
            q, s = torch.zeros(n, k, dtype=torch.int8), torch.ones(n)
            for m in (1, 5, 16, 40, 64, 200, 256):
                for bias in (None, torch.zeros(n, dtype=dtype)):
                    im.int8_linear(torch.zeros(m, k, dtype=dtype), q, s, bias)
    for dtype in (torch.bfloat16, torch.float16):
        # tests/gpu/test_int8_matmul_gpu.py: N 1500, K 1000 (no multiple of 16), rows sliced.
        q, s = torch.zeros(1500, 1000, dtype=torch.int8), torch.ones(1500)
        x = torch.zeros(300, 1000, dtype=dtype)
        for m in (1, 16, 17, 64, 65, 300):
            im.int8_linear(x[:m], q, s, torch.zeros(1500, dtype=dtype))
            im.int8_linear(x[:m], q, s)
        for r in range(16):
            im.int8_linear(x[r:r + 1], q, s)
    variants = {variant_key(v) for v in ck._variants() if v[0].startswith("int8")}
    missing = {key for key in keys if key[0] in {v[0] for v in variants}} - variants
    return (f"{len(missing)} of {len(keys)} launched int8 specialisations are not compiled "
            f"by bench/compile_kernels.py, e.g. {sorted(missing, key=str)[:2]}"
            if missing else "")


def fp_fusion_mismatch() -> str:
    """Every variant compiles with the enable_fp_fusion its kernel's launches pass, and every
    @triton.jit kernel of llmbatch has a variant."""
    from tests.runtime.test_fp_fusion import UNFUSED, jit_kernels

    variants = ck._variants()
    wrong = [label for label, fn, _, _, opts, *_ in variants
             if opts.get("enable_fp_fusion", "unset") is not (fn.fn.__name__ not in UNFUSED)]
    uncompiled = jit_kernels() - {fn.fn.__name__ for _, fn, *_ in variants}
    return "\n".join(
        ([f"{len(wrong)} variants compile with another enable_fp_fusion than their launches "
          f"pass (True; False for {sorted(UNFUSED)}), e.g. {wrong[:2]}"] if wrong else [])
        + ([f"kernels without a variant in bench/compile_kernels.py: {sorted(uncompiled)}"]
           if uncompiled else []))


def test_every_launched_specialisation_is_compiled():
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "tests.test_compile_kernels_coverage"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "covered" in proc.stdout, proc.stdout + proc.stderr[-3000:]


if __name__ == "__main__":
    from bench import compile_kernels as ck
    from llmbatch.runtime.layers import gemv as gv
    from llmbatch.runtime.layers import int8_matmul as im
    from llmbatch.runtime.layers import skinny_matmul as sm

    rec = recorded()
    problems = [p for p in (skinny_missing(rec), gemv_missing(rec), int8_missing(rec),
                            fp_fusion_mismatch()) if p]
    print("\n".join(problems) or f"all {len(rec[0])} launched specialisations covered")
    sys.exit(1 if problems else 0)
