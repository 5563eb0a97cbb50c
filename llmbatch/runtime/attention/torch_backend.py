"""Torch reference attention: gather each span's pages, then SDPA. Runs everywhere.

This is the correctness oracle the Triton kernels are tested against, so it favours
obviousness over speed: one SDPA call per span.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmbatch.runtime.attention.backend import AttentionBackend, AttentionMetadata


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def write_kv(self, key, value, k_cache, v_cache, slot_mapping) -> None:
        num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
        valid = slot_mapping >= 0
        if not bool(valid.all()):
            key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
        # View the pool as flat slots: (num_blocks * block_size, num_kv_heads, head_dim).
        k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
        v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value.to(v_cache.dtype))

    def forward(self, query, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        num_tokens, num_heads, head_dim = query.shape
        block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
        group = num_heads // num_kv_heads
        if meta.max_query_len == 1 and num_tokens == meta.num_seqs:
            return self._decode_batched(query, k_cache, v_cache, meta, scale)
        starts = meta.query_start_loc_cpu or meta.query_start_loc.tolist()
        seq_lens = meta.seq_lens_cpu or meta.seq_lens.tolist()
        out = torch.empty_like(query)
        for i, seq_len in enumerate(seq_lens):
            q_start, q_end = starts[i], starts[i + 1]
            query_len = q_end - q_start
            if query_len == 0:
                continue
            num_pages = (seq_len + block_size - 1) // block_size
            pages = meta.block_tables[i, :num_pages].long()
            # (seq_len, num_kv_heads, head_dim) after dropping the tail of the last page.
            k = k_cache[pages].reshape(-1, num_kv_heads, head_dim)[:seq_len]
            v = v_cache[pages].reshape(-1, num_kv_heads, head_dim)[:seq_len]
            # GQA: each KV head serves `group` consecutive query heads.
            k = k.repeat_interleave(group, dim=1).transpose(0, 1).to(query.dtype)  # (H, S, D)
            v = v.repeat_interleave(group, dim=1).transpose(0, 1).to(query.dtype)
            q = query[q_start:q_end].transpose(0, 1)                              # (H, Q, D)
            # Query row r sits at absolute position seq_len - query_len + r; it may see keys
            # at positions <= its own. Bottom-right aligned causal mask.
            if query_len == 1:
                # A single query (decode) sees the whole context: no mask needed.
                o = F.scaled_dot_product_attention(q, k, v, scale=scale)
            elif query_len == seq_len:
                # Nothing cached before the span: plain causal attention.
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
            else:
                q_pos = torch.arange(seq_len - query_len, seq_len, device=query.device)
                k_pos = torch.arange(seq_len, device=query.device)
                mask = k_pos[None, :] <= q_pos[:, None]                           # (Q, S)
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
            out[q_start:q_end] = o.transpose(0, 1)
        return out

    @staticmethod
    def _decode_batched(query, k_cache, v_cache, meta: AttentionMetadata, scale: float):
        """Pure decode (one query per sequence): one padded SDPA call for the whole batch.

        Each query sees its sequence's first seq_len keys; keys past it (padding up to the
        longest sequence, read from block 0 or a page's unused tail) are masked out.
        """
        num_seqs, num_heads, head_dim = query.shape
        block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
        group = num_heads // num_kv_heads
        max_len = meta.max_seq_len
        num_pages = (max_len + block_size - 1) // block_size
        pages = meta.block_tables[:, :num_pages].long()                 # (B, P)
        # (B, P, block_size, Hkv, D) -> (B, Hkv, S, D) for the first max_len positions.
        k = k_cache[pages].reshape(num_seqs, -1, num_kv_heads, head_dim)[:, :max_len]
        v = v_cache[pages].reshape(num_seqs, -1, num_kv_heads, head_dim)[:, :max_len]
        k = k.transpose(1, 2).repeat_interleave(group, dim=1).to(query.dtype)   # (B, H, S, D)
        v = v.transpose(1, 2).repeat_interleave(group, dim=1).to(query.dtype)
        positions = torch.arange(max_len, device=query.device)
        mask = positions[None, :] < meta.seq_lens[:, None].to(positions.dtype)  # (B, S)
        # Padding slots may hold anything (even NaN); 0 * NaN would leak through the softmax
        # weights, so zero them as well as masking them.
        valid = mask[:, None, :, None]
        k = torch.where(valid, k, torch.zeros((), dtype=k.dtype, device=k.device))
        v = torch.where(valid, v, torch.zeros((), dtype=v.dtype, device=v.device))
        q = query.unsqueeze(2)                                                  # (B, H, 1, D)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :],
                                             scale=scale)
        return out.squeeze(2)                                                   # (B, H, D)
