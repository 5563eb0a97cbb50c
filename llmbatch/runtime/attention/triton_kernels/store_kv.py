"""Write this step's new K/V rows into the paged cache at their flat slots.

One program per token. A token whose slot is negative is padding (a CUDA-graph batch padded
to a captured size, say) and is skipped without touching the cache, so the launch needs no
host-side filtering and therefore no sync.

Layouts (see ../backend.py):
    key, value:        (num_tokens, num_kv_heads, head_dim), any token/head strides, dim stride 1
    k_cache, v_cache:  (num_blocks, block_size, num_kv_heads, head_dim), dim stride 1
    slot_mapping:      (num_tokens,) int32 or int64; slot = block * block_size + offset
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmbatch.runtime.fp_fusion import FP_FUSION


@triton.jit
def _store_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    num_kv_heads,
    stride_key_tok, stride_key_head,
    stride_value_tok, stride_value_head,
    stride_kc_blk, stride_kc_slot, stride_kc_head,
    stride_vc_blk, stride_vc_slot, stride_vc_head,
    BLOCK_SIZE: tl.constexpr,
    HEADS_PAD: tl.constexpr,    # next power of two >= num_kv_heads (tl.arange needs powers of two)
    HEAD_DIM: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + tok).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE

    offs_h = tl.arange(0, HEADS_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = (offs_h < num_kv_heads)[:, None]     # (HEADS_PAD, 1): padded heads do nothing

    # (HEADS_PAD, HEAD_DIM) tiles; cast to the cache dtype on the way in.
    k = tl.load(key_ptr + tok * stride_key_tok
                + offs_h[:, None] * stride_key_head + offs_d[None, :], mask=mask)
    v = tl.load(value_ptr + tok * stride_value_tok
                + offs_h[:, None] * stride_value_head + offs_d[None, :], mask=mask)
    k_dst = (k_cache_ptr + block * stride_kc_blk + offset * stride_kc_slot
             + offs_h[:, None] * stride_kc_head + offs_d[None, :])
    v_dst = (v_cache_ptr + block * stride_vc_blk + offset * stride_vc_slot
             + offs_h[:, None] * stride_vc_head + offs_d[None, :])
    tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Launch `_store_kv_kernel`; the caller has validated shapes, dtypes and strides."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    block_size = k_cache.shape[1]
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        num_kv_heads,
        key.stride(0), key.stride(1),
        value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        BLOCK_SIZE=block_size,
        HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim,
        num_warps=1 if num_kv_heads * head_dim <= 512 else 4, **FP_FUSION,
    )
