"""Every Triton kernel launch of llmbatch names enable_fp_fusion (runtime/fp_fusion.py): True,
FMA contraction as the kernels were measured and tested, except the rotary kernels (False,
torch's roundings). A launch that left it out would take Triton's default, which Triton 3.10
turns off. The launchers run on small CPU tensors with Triton's launch replaced by a recorder
(no kernel runs); every @triton.jit *_kernel in llmbatch's sources must be launched here, so a
new kernel cannot slip past. tests/test_compile_kernels_coverage.py checks that
bench/compile_kernels.py compiles each kernel with the same option."""

from __future__ import annotations

import os
import re

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Kernels launched with enable_fp_fusion=False (their modules' docstrings say why).
UNFUSED = {"_rotary_kernel", "_rotary_store_kv_kernel", "_rotary_decode_kernel"}
_JIT_KERNEL = re.compile(r"@triton\.jit(?:\([^)]*\))?\s*\ndef (\w+_kernel)\(")


def jit_kernels() -> set[str]:
    """Names of the @triton.jit functions called *_kernel under llmbatch/."""
    names = set()
    for dirpath, _, files in os.walk(os.path.join(ROOT, "llmbatch")):
        for f in files:
            if f.endswith(".py"):
                with open(os.path.join(dirpath, f)) as fh:
                    names.update(_JIT_KERNEL.findall(fh.read()))
    return names


@pytest.fixture
def launches(monkeypatch):
    """{kernel name: [enable_fp_fusion of each launch, "unset" where absent]}; the kernels
    do not run (outputs stay uninitialised)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    seen: dict[str, list] = {}

    def record(self, *args, grid, warmup, **kwargs):
        seen.setdefault(self.fn.__name__, []).append(kwargs.get("enable_fp_fusion", "unset"))

    for cls in (InterpretedFunction, JITFunction):
        monkeypatch.setattr(cls, "run", record)
    return seen


def _launch_everything() -> None:
    """Each launcher once, with options that reach every kernel (split-K reduces, the
    unfused attention split reduce)."""
    from llmbatch.runtime.attention.triton_kernels.paged_attention import paged_attention
    from llmbatch.runtime.attention.triton_kernels.rotary_decode import \
        rotary_decode_attention
    from llmbatch.runtime.attention.triton_kernels.store_kv import store_kv
    from llmbatch.runtime.layers import fused_kernels, fused_rotary, gemv, int8_matmul, \
        l2_prefetch, nf4_matmul, skinny_matmul
    from llmbatch.runtime.triton_argmax import triton_argmax

    z = lambda *s, dtype=torch.float32: torch.zeros(*s, dtype=dtype)  # noqa: E731
    # Attention: 2 one-token sequences, 4 q heads over 2 kv heads, head_dim 16, 2 splits.
    q, k, v, out = z(2, 4, 16), z(2, 2, 16), z(2, 2, 16), z(2, 4, 16)
    k_cache, v_cache = z(4, 16, 2, 16), z(4, 16, 2, 16)
    slots, cos, sin = torch.arange(2), z(2, 1, 8), z(2, 1, 8)
    tables = torch.zeros(2, 4, dtype=torch.int32)
    seq_lens, starts = torch.ones(2, dtype=torch.int32), torch.arange(3, dtype=torch.int32)
    tiles = dict(block_q=8, block_m=16, tile_n=16, num_splits=2)
    store_kv(k, v, k_cache, v_cache, slots)
    paged_attention(out, q, k_cache, v_cache, tables, seq_lens, starts, 0.25, **tiles)
    rotary_decode_attention(out, q, k, v, cos, sin, slots, k_cache, v_cache, tables, seq_lens,
                            starts, 0.25, **tiles)
    fused_rotary.fused_rotary(q, k, cos, sin)
    fused_rotary.fused_rotary_store_kv(q, k, v, cos, sin, k_cache, v_cache, slots)
    # Layers: 64 inputs, 32 outputs.
    x, w = z(2, 64), z(32, 64)
    fused_kernels.fused_rms_norm(x, z(64), 1e-6)
    fused_kernels.fused_silu_and_mul(x)
    gemv.gemv_linear(x[:1], w, config=gemv.GemvConfig(block_n=16, block_k=16, split_k=2))
    gemv.gemv_linear(x, w, config=gemv.GemvConfig(block_n=16, block_k=16, split_k=2))
    skinny_matmul.skinny_linear(x, w, config=skinny_matmul.SkinnyConfig(block_k=16, split_k=2))
    int8_matmul.int8_linear(x, z(32, 64, dtype=torch.int8), torch.ones(32))
    nf4_matmul.nf4_linear(x, z(32 * 32, dtype=torch.uint8), torch.ones(32), z(16), 32, 64)
    l2_prefetch.l2_touch(z(4096, dtype=torch.int32), z(l2_prefetch.MAX_PROGRAMS,
                                                         dtype=torch.int32))
    triton_argmax(z(2, 3000))


def test_every_launch_names_fp_fusion(launches):
    _launch_everything()
    assert set(launches) == jit_kernels(), "launch every kernel here: each needs the check"
    wrong = {name: values for name, values in launches.items()
             if any(v is not (name not in UNFUSED) for v in values)}
    assert not wrong, (f"launches without enable_fp_fusion=True (False for {sorted(UNFUSED)}): "
                       f"{wrong}")
