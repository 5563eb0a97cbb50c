"""Fused rotary embedding (Triton): q and k rotated in one launch, optionally with the rotated k
and v stored straight into the paged KV cache (the attention backend's write_kv, fused in).

One program per token over all of its heads, cos/sin loaded once. Numerics copy
RotaryEmbedding.rotate rounding step by rounding step: every product and the sum are rounded to
the activations' dtype, as torch's half-precision ops do (a product of two fp16/bf16 values is
exact in float32, so a float32 multiply then one rounding equals torch's). The kernels are
compiled with enable_fp_fusion=False: otherwise LLVM narrows x1*cos to a bf16 multiply and
fuses it into the subtraction (one fma.rn.bf16 rounding instead of two), which an H200 run
showed as 1-ulp differences.

Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmbatch.runtime import pdl
from llmbatch.runtime.pdl import pdl_wait_then_release

from llmbatch.runtime.layers.fused_kernels import SUPPORTED_DTYPES


@triton.jit
def rotate_half(x, x_partner, cos, sin, first_half):
    """Rotate-half element by element: x[d] and its partner x[d +- half] (same dtype), cos/sin
    (float32) at d % half, first_half: d < half. Rounds like RotaryEmbedding.rotate, whose
    every torch op rounds to the dtype: each product, then the difference (x1*cos - x2*sin,
    first half) or sum (x2*cos + x1*sin, second half). Shared with the one-launch decode
    attention (attention/triton_kernels/rotary_decode.py)."""
    dt = x.dtype
    a = (x.to(tl.float32) * cos).to(dt).to(tl.float32)
    b = (x_partner.to(tl.float32) * sin).to(dt).to(tl.float32)
    return tl.where(first_half, a - b, a + b).to(dt)


@triton.jit
def _rotate_heads(base, head_stride, obase, out_head_stride, num_heads, half, cos, sin,
                  HEADS: tl.constexpr, BLOCK: tl.constexpr):
    """Rotate-half of every head of one token: x = [x1 | x2] per head, each `half` long.
    cos, sin: (1, BLOCK) float32, shared by all heads."""
    heads = tl.arange(0, HEADS).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = (heads < num_heads)[:, None] & (cols < half)[None, :]
    ptrs = base + heads[:, None] * head_stride + cols[None, :]          # (HEADS, BLOCK)
    x1 = tl.load(ptrs, mask=mask, other=0.0)
    x2 = tl.load(ptrs + half, mask=mask, other=0.0)
    optrs = obase + heads[:, None] * out_head_stride + cols[None, :]
    tl.store(optrs, rotate_half(x1, x2, cos, sin, True), mask=mask)
    tl.store(optrs + half, rotate_half(x2, x1, cos, sin, False), mask=mask)


@triton.jit
def _rotate_q(tok, q_ptr, cos_ptr, sin_ptr, q_out_ptr, q_tok_stride, q_head_stride,
              cs_tok_stride, q_out_tok_stride, q_out_head_stride, num_q_heads, half,
              Q_HEADS: tl.constexpr, BLOCK: tl.constexpr):
    """Load the token's cos/sin and rotate its q heads into q_out; returns cos, sin as
    (1, BLOCK) float32 for the k heads."""
    cols = tl.arange(0, BLOCK)
    cmask = cols < half
    cos = tl.load(cos_ptr + tok * cs_tok_stride + cols, mask=cmask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + tok * cs_tok_stride + cols, mask=cmask, other=0.0).to(tl.float32)
    cos, sin = cos[None, :], sin[None, :]
    _rotate_heads(q_ptr + tok * q_tok_stride, q_head_stride,
                  q_out_ptr + tok * q_out_tok_stride, q_out_head_stride, num_q_heads, half,
                  cos, sin, Q_HEADS, BLOCK)
    return cos, sin


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr,
                   q_tok_stride, q_head_stride, k_tok_stride, k_head_stride, cs_tok_stride,
                   q_out_tok_stride, q_out_head_stride, k_out_tok_stride, k_out_head_stride,
                   num_q_heads, num_k_heads, half,
                   Q_HEADS: tl.constexpr, K_HEADS: tl.constexpr, BLOCK: tl.constexpr,
                   USE_PDL: tl.constexpr = False):
    # One program per token: all its q heads and k heads, cos/sin loaded once. (A program per
    # (token, head) made 40 x 32-element programs per token on the 1B shape: the slowest fused
    # kernel in an H200 profile of W-RANDOM's prefill.)
    if USE_PDL:
        pdl_wait_then_release()
    tok = tl.program_id(0).to(tl.int64)
    cos, sin = _rotate_q(tok, q_ptr, cos_ptr, sin_ptr, q_out_ptr, q_tok_stride, q_head_stride,
                         cs_tok_stride, q_out_tok_stride, q_out_head_stride, num_q_heads, half,
                         Q_HEADS, BLOCK)
    _rotate_heads(k_ptr + tok * k_tok_stride, k_head_stride,
                  k_out_ptr + tok * k_out_tok_stride, k_out_head_stride, num_k_heads, half,
                  cos, sin, K_HEADS, BLOCK)


@triton.jit
def _rotary_store_kv_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, q_out_ptr,
                            k_cache_ptr, v_cache_ptr, slot_ptr,
                            q_tok_stride, q_head_stride, k_tok_stride, k_head_stride,
                            v_tok_stride, v_head_stride, cs_tok_stride,
                            q_out_tok_stride, q_out_head_stride,
                            kc_blk_stride, kc_slot_stride, kc_head_stride,
                            vc_blk_stride, vc_slot_stride, vc_head_stride,
                            num_q_heads, num_k_heads, half,
                            BLOCK_SIZE: tl.constexpr, Q_HEADS: tl.constexpr,
                            K_HEADS: tl.constexpr, BLOCK: tl.constexpr,
                            USE_PDL: tl.constexpr = False):
    # One program per token: rotate its q heads into q_out, and its k heads straight into the
    # paged K cache at the token's slot, copying v into the V cache beside them -- the rotary
    # and the attention backend's K/V store in one launch. A negative slot (CUDA-graph
    # padding) writes nothing to the caches.
    if USE_PDL:
        pdl_wait_then_release()
    tok = tl.program_id(0).to(tl.int64)
    cos, sin = _rotate_q(tok, q_ptr, cos_ptr, sin_ptr, q_out_ptr, q_tok_stride, q_head_stride,
                         cs_tok_stride, q_out_tok_stride, q_out_head_stride, num_q_heads, half,
                         Q_HEADS, BLOCK)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot >= 0:
        blk = slot // BLOCK_SIZE
        off = slot % BLOCK_SIZE
        _rotate_heads(k_ptr + tok * k_tok_stride, k_head_stride,
                      k_cache_ptr + blk * kc_blk_stride + off * kc_slot_stride, kc_head_stride,
                      num_k_heads, half, cos, sin, K_HEADS, BLOCK)
        heads = tl.arange(0, K_HEADS).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = (heads < num_k_heads)[:, None] & (cols < half)[None, :]
        src = v_ptr + tok * v_tok_stride + heads[:, None] * v_head_stride + cols[None, :]
        dst = (v_cache_ptr + blk * vc_blk_stride + off * vc_slot_stride
               + heads[:, None] * vc_head_stride + cols[None, :])
        for part in tl.static_range(2):   # the two halves of each head vector
            x = tl.load(src + part * half, mask=mask, other=0.0)
            tl.store(dst + part * half, x.to(v_cache_ptr.dtype.element_ty), mask=mask)


def _check_rotary_input(name: str, x: torch.Tensor, cos: torch.Tensor) -> None:
    if x.dim() != 3 or x.shape[-1] % 2 or x.stride(-1) != 1:
        raise ValueError(f"{name} must be (num_tokens, num_heads, even head_dim) with unit last "
                         f"stride, got shape {tuple(x.shape)} strides {x.stride()}")
    if x.dtype != cos.dtype or x.device != cos.device or x.shape[0] != cos.shape[0] \
            or 2 * cos.shape[-1] != x.shape[-1]:
        raise ValueError(f"{name} {tuple(x.shape)} {x.dtype} on {x.device} does not match cos "
                         f"{tuple(cos.shape)} {cos.dtype} on {cos.device}")


def _check_rotary_args(query, key, cos, sin) -> None:
    """Check the rotary inputs: one clear error each."""
    for name, t in (("query", query), ("key", key), ("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} dtype {t.dtype} is not supported by the fused kernels "
                             f"(use float16, bfloat16 or float32)")
    # Contiguous, or views of one (num_tokens, 2, head_dim/2) table gather (rotary.py): the
    # kernels read both at tok * cos.stride(0) + column.
    if cos.shape != sin.shape or cos.dim() != 3 or cos.shape[1] != 1 \
            or cos.stride() != sin.stride() or cos.stride(-1) != 1 or cos.dtype != sin.dtype:
        raise ValueError(f"cos and sin must be (num_tokens, 1, head_dim/2) of one dtype and "
                         f"one stride, unit along head_dim, got {tuple(cos.shape)} "
                         f"{cos.stride()} and {tuple(sin.shape)} {sin.stride()}")
    _check_rotary_input("query", query, cos)
    _check_rotary_input("key", key, cos)


def check_rotary_store_args(query, key, value, cos, sin, k_cache, v_cache,
                            slot_mapping) -> None:
    """The inputs of a rotary + K/V store (fused_rotary_store_kv, and the attention backend's
    forward_rotary_decode): one clear error each."""
    _check_rotary_args(query, key, cos, sin)
    if value.shape != key.shape or value.stride(-1) != 1 or value.dtype != key.dtype:
        raise ValueError(f"value must match key {tuple(key.shape)} {key.dtype} with a unit last "
                         f"stride, got {tuple(value.shape)} {value.dtype}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape \
            or tuple(k_cache.shape[2:]) != tuple(key.shape[1:]) \
            or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError(f"k_cache/v_cache must be (num_blocks, block_size, {key.shape[1]}, "
                         f"{key.shape[2]}) contiguous along head_dim, got {tuple(k_cache.shape)}")
    if slot_mapping.shape != (key.shape[0],) or slot_mapping.is_floating_point():
        raise ValueError(f"slot_mapping must be an integer tensor of shape ({key.shape[0]},)")


def fused_rotary(query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """query (num_tokens, num_heads, head_dim), key (num_tokens, num_kv_heads, head_dim), rows
    may be strided (views of a fused qkv); cos, sin (num_tokens, 1, head_dim/2) of one stride
    (contiguous, or views of a table gather), in the activations' dtype
    (RotaryEmbedding.cos_sin). Returns new contiguous rotated q, k equal
    to RotaryEmbedding.rotate of each, from one launch: a program per token over all its heads."""
    _check_rotary_args(query, key, cos, sin)
    q_out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    k_out = torch.empty(key.shape, dtype=key.dtype, device=key.device)
    num_tokens, num_q_heads, head_dim = query.shape
    num_k_heads = key.shape[1]
    if num_tokens and num_q_heads + num_k_heads:
        half = head_dim // 2
        block = triton.next_power_of_2(half)
        q_heads = triton.next_power_of_2(max(1, num_q_heads))
        k_heads = triton.next_power_of_2(max(1, num_k_heads))
        _rotary_kernel[(num_tokens,)](
            query, key, cos, sin, q_out, k_out,
            query.stride(0), query.stride(1), key.stride(0), key.stride(1), cos.stride(0),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
            num_q_heads, num_k_heads, half, Q_HEADS=q_heads, K_HEADS=k_heads, BLOCK=block,
            num_warps=4 if q_heads * block >= 1024 else 1,
            # No FMA contraction: LLVM otherwise narrows x1*cos to a bf16 multiply and fuses
            # it into the subtraction (fma.rn.bf16, one rounding instead of torch's two),
            # which an H200 run showed as 1-ulp differences from RotaryEmbedding.rotate.
            enable_fp_fusion=False, **pdl.launch_kwargs(query.device))
    return q_out, k_out


def fused_rotary_store_kv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                          v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """fused_rotary for query, while the rotated key and the value go straight into the paged
    caches at slot_mapping, as AttentionBackend.write_kv would store them (negative slots are
    skipped). Returns the rotated query (contiguous).

    value: (num_tokens, num_kv_heads, head_dim), rows may be strided; k_cache, v_cache:
    (num_blocks, block_size, num_kv_heads, head_dim), contiguous along head_dim (the layout of
    attention/backend.py); slot_mapping (num_tokens,) integer."""
    check_rotary_store_args(query, key, value, cos, sin, k_cache, v_cache, slot_mapping)
    q_out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    num_tokens, num_q_heads, head_dim = query.shape
    num_k_heads = key.shape[1]
    if num_tokens:
        half = head_dim // 2
        block = triton.next_power_of_2(half)
        q_heads = triton.next_power_of_2(max(1, num_q_heads))
        _rotary_store_kv_kernel[(num_tokens,)](
            query, key, value, cos, sin, q_out, k_cache, v_cache, slot_mapping.contiguous(),
            query.stride(0), query.stride(1), key.stride(0), key.stride(1),
            value.stride(0), value.stride(1), cos.stride(0),
            q_out.stride(0), q_out.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            num_q_heads, num_k_heads, half,
            BLOCK_SIZE=k_cache.shape[1], Q_HEADS=q_heads,
            K_HEADS=triton.next_power_of_2(max(1, num_k_heads)), BLOCK=block,
            num_warps=4 if q_heads * block >= 1024 else 1,
            enable_fp_fusion=False,   # same roundings as torch: see fused_rotary
            **pdl.launch_kwargs(query.device))
    return q_out
