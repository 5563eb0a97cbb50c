"""The attention seam: metadata for one step and the backend interface.

Layout of one layer's KV cache (both backends):
    k_cache, v_cache: (num_blocks, block_size, num_kv_heads, head_dim)
A token at logical position p of a sequence lives in physical block block_table[p // block_size]
at offset p % block_size, i.e. flat slot  block_table[p // block_size] * block_size + p % block_size.

One step computes a batch of query spans (one span per scheduled request), flattened:
    q: (num_tokens, num_heads, head_dim), span i = rows query_start_loc[i]:query_start_loc[i+1]
Span i's queries are the LAST query_len_i positions of a sequence of seq_lens[i] tokens, so the
query at row r of span i has absolute position seq_lens[i] - query_len_i + (r - start_i), and
attends causally to positions 0..that position (which includes cached prefix tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor      # (num_tokens,) int64: flat cache slot for each new token's K/V
    query_start_loc: torch.Tensor   # (num_seqs + 1,) int32: cumulative query lengths, starts at 0
    seq_lens: torch.Tensor          # (num_seqs,) int32: context length incl. this step's tokens
    block_tables: torch.Tensor      # (num_seqs, max_blocks_per_seq) int32, padded with 0
    max_query_len: int
    max_seq_len: int
    # Host copies, so backends that loop on the CPU never sync with the device.
    query_start_loc_cpu: list[int] | None = None
    seq_lens_cpu: list[int] | None = None

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def is_pure_decode(self) -> bool:
        return self.max_query_len == 1


class AttentionBackend:
    """Writes new K/V into the paged cache and attends over it."""

    name = "abstract"

    def write_kv(
        self,
        key: torch.Tensor,          # (num_tokens, num_kv_heads, head_dim)
        value: torch.Tensor,        # (num_tokens, num_kv_heads, head_dim)
        k_cache: torch.Tensor,      # (num_blocks, block_size, num_kv_heads, head_dim)
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,  # (num_tokens,) int64; a negative slot means "skip" (padding)
    ) -> None:
        raise NotImplementedError

    def forward(
        self,
        query: torch.Tensor,        # (num_tokens, num_heads, head_dim)
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:              # (num_tokens, num_heads, head_dim), dtype of query
        raise NotImplementedError
