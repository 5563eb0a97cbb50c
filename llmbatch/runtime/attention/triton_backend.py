"""Triton attention backend: paged K/V store and one paged varlen attention kernel family.

Same contract as the torch oracle (backend.py). This file validates inputs (one clear error per
bad input, checked on the host from shapes and dtypes only) and picks launch sizes from Python
ints already in AttentionMetadata (max_query_len, max_seq_len, num_seqs), so a step never waits
on the device and the calls can be captured in a CUDA graph.

Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (the tests do this; it must be
set before triton is first imported).
"""

from __future__ import annotations

import functools
import os

import torch
import triton

from llmbatch.runtime.attention.backend import AttentionBackend, AttentionMetadata
from llmbatch.runtime.attention.triton_kernels import paged_attention, store_kv
from llmbatch.runtime.attention.triton_kernels.paged_attention import split_counter_slots

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Steps whose spans are at most this long may be split: decode, and k+1 speculative tokens
# being verified (k <= 7). Split boundaries come from the sequence's length rounded to a power
# of two of tiles per split (paged_attention.py) AND the split count, so for a verify row's
# result not to depend on where its window starts, steps of spans > 1 take their split count
# from the batch only (_num_splits), as the captured verify graphs do. Until stop 9 verify
# spans were never split: a batch-1 verify step ran 8 programs over the whole context, ~250 us
# more than a decode step on an H200.
_SPLIT_MAX_QUERY_LEN = 8
# At least one key tile per split. Batch-1 decode is the case this is for (W-BATCH1: 8 KV heads
# leave 124 of 132 SMs idle, and each KV head's walk is latency-bound), so split finely; the
# merge pass reads only num_splits fp32 rows per (token, head).
_MIN_KEYS_PER_SPLIT = 64
_MAX_SPLITS = 16


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _default_tile_n(head_dim: int, max_query_len: int, num_seqs: int) -> int:
    """Keys per inner-loop step. Wide decode batches (every SM busy without splits) read K/V in
    longer runs with 128-key tiles: on an H200 (bench_attention --sweep, head_dim 64) 53 % vs
    43 % of copy bandwidth at batch 64 and 78 % vs 73 % at batch 256; 64 elsewhere."""
    if head_dim > 128:
        return 32
    if max_query_len == 1 and num_seqs >= 64 and head_dim <= 64:
        return 128
    return 64


def _prev_power_of_2(n: int) -> int:
    return 1 << (n.bit_length() - 1)


class TritonAttentionBackend(AttentionBackend):
    """Args (all optional; defaults are the tuned choices):
    num_kv_splits: force the split-KV count (1 = never split); None = heuristic.
    max_block_m:   cap on query-tile rows (tokens x grouped heads) for prefill spans.
    tile_n:        keys per inner-loop step; None = _default_tile_n (64; 128 for wide decode
                   batches at head_dim <= 64; 32 for head_dim > 128).
    fused_split_reduce: split-KV partials merged inside the attention kernel by the last split
                   to finish (triton_kernels/split_reduce.py), not by a second launch. Opt-in;
                   measured 0.99x at batch 1 on an H200 (stops 13, 17). Set before CUDA graphs
                   are captured.
    rotary_in_attention: decode and speculative-verify-like steps (every span one query
                   tile of <= 8 tokens: rotary_in_attention_fits) rotate q and k, store K/V
                   and attend in one launch (forward_rotary_decode; LlamaAttention.attend
                   takes it when set; spans > 1 token UNMEASURED on a GPU).
                   EngineConfig.rotary_in_attention (auto since stop 19: ModelRunner sets
                   it with the fused rotary; 1.02x at batch 1 on an H200). Set before CUDA
                   graphs are captured.
    """

    name = "triton"

    def __init__(self, num_kv_splits: int | None = None, max_block_m: int = 64,
                 tile_n: int | None = None, fused_split_reduce: bool = False,
                 rotary_in_attention: bool = False) -> None:
        if num_kv_splits is not None and num_kv_splits < 1:
            raise ValueError(f"num_kv_splits must be >= 1 or None, got {num_kv_splits}")
        for name, value in (("max_block_m", max_block_m), ("tile_n", tile_n)):
            if value is not None and (value < 16 or value & (value - 1)):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")
        self.num_kv_splits = num_kv_splits
        self.max_block_m = max_block_m
        self.tile_n = tile_n
        self.fused_split_reduce = fused_split_reduce
        self.rotary_in_attention = rotary_in_attention
        # Zeroed int32 counters per device for the fused reduce (the kernel leaves them zero).
        # A larger launch gets a new, larger tensor; the old ones stay alive, since a captured
        # CUDA graph keeps using the one it was captured with.
        self._split_counters: dict[torch.device, list[torch.Tensor]] = {}

    # ------------------------------------------------------------------ K/V store

    def write_kv(self, key, value, k_cache, v_cache, slot_mapping) -> None:
        _check_cache(k_cache, v_cache)
        _check_runnable(key, k_cache, v_cache, slot_mapping)
        if key.dim() != 3 or key.shape != value.shape:
            raise ValueError(f"key and value must both be (num_tokens, num_kv_heads, head_dim), "
                             f"got {tuple(key.shape)} and {tuple(value.shape)}")
        if tuple(key.shape[1:]) != tuple(k_cache.shape[2:]):
            raise ValueError(f"key heads/head_dim {tuple(key.shape[1:])} do not match the cache's "
                             f"{tuple(k_cache.shape[2:])}")
        if slot_mapping.shape != (key.shape[0],) or slot_mapping.is_floating_point():
            raise ValueError(f"slot_mapping must be an integer tensor of shape ({key.shape[0]},), "
                             f"got {slot_mapping.dtype} {tuple(slot_mapping.shape)}")
        _check_dtype("key", key)
        _check_dtype("value", value)
        store_kv(_last_dim_contiguous(key), _last_dim_contiguous(value), k_cache, v_cache,
                 slot_mapping.contiguous())

    # ------------------------------------------------------------------ attention

    def forward(self, query, k_cache, v_cache, meta: AttentionMetadata, scale: float,
                out: torch.Tensor | None = None):
        """As AttentionBackend.forward; `out` (optional, query's shape and dtype) is written in
        place and returned, for callers that keep persistent buffers (CUDA graphs)."""
        query, out = self._checked_query(query, k_cache, v_cache, meta, out)
        if query.shape[0] == 0 or meta.num_seqs == 0:
            return out
        paged_attention(
            out, query, k_cache, v_cache,
            meta.block_tables, meta.seq_lens.contiguous(), meta.query_start_loc.contiguous(),
            scale, **self._launch_sizes(query, k_cache, meta))
        return out

    def forward_rotary_decode(self, query, key, value, cos, sin, k_cache, v_cache,
                              meta: AttentionMetadata, scale: float,
                              out: torch.Tensor | None = None):
        """write_kv + forward in one launch (triton_kernels/rotary_decode.py) for a step whose
        query and key are NOT rotated yet and whose every span is one query tile of at most
        _SPLIT_MAX_QUERY_LEN tokens (decode, speculative verify; rotary_in_attention_fits):
        rotates them with cos/sin (RotaryEmbedding.cos_sin rows, as fused_rotary_store_kv
        takes them), stores the rotated key and the value at meta.slot_mapping (negative slots
        skipped), attends. Same result as fused_rotary_store_kv then forward (bitwise in the
        interpreter). The path of rotary_in_attention (LlamaAttention.attend)."""
        from llmbatch.runtime.attention.triton_kernels.rotary_decode import (
            rotary_decode_attention)
        from llmbatch.runtime.layers.fused_rotary import check_rotary_store_args

        check_rotary_store_args(query, key, value, cos, sin, k_cache, v_cache, meta.slot_mapping)
        query, out = self._checked_query(query, k_cache, v_cache, meta, out)
        limit = self._rotary_max_span(meta.max_query_len, query.shape[1] // k_cache.shape[2])
        if meta.max_query_len > limit:
            raise ValueError(f"forward_rotary_decode takes spans of at most {limit} tokens "
                             f"(one query tile, <= {_SPLIT_MAX_QUERY_LEN}), got "
                             f"max_query_len={meta.max_query_len}")
        if query.shape[0] == 0 or meta.num_seqs == 0:
            return out
        rotary_decode_attention(
            out, query, key, value, cos, sin, meta.slot_mapping.contiguous(), k_cache, v_cache,
            meta.block_tables, meta.seq_lens.contiguous(), meta.query_start_loc.contiguous(),
            scale, **self._launch_sizes(query, k_cache, meta))
        return out

    def rotary_in_attention_fits(self, meta: AttentionMetadata, num_heads: int,
                                 num_kv_heads: int) -> bool:
        """Whether LlamaAttention.attend takes forward_rotary_decode for this step:
        rotary_in_attention is on and every span fits one query tile of the launch, of at
        most _SPLIT_MAX_QUERY_LEN tokens. Host ints only (CUDA-graph capture). Asked by every
        layer of every step: a prefill span (> 8 tokens) answers before the tiling is worked out."""
        return (self.rotary_in_attention and meta.max_query_len <= _SPLIT_MAX_QUERY_LEN
                and meta.max_query_len <= self._rotary_max_span(meta.max_query_len,
                                                                num_heads // num_kv_heads))

    def _rotary_max_span(self, max_query_len: int, group: int) -> int:
        """The longest span forward_rotary_decode takes in a step of max_query_len: one query
        tile (its programs store their own span's keys only, so a span may not have two
        tiles: the second's rows read the first's keys), and verify-like spans only."""
        return min(_SPLIT_MAX_QUERY_LEN, self._query_tiling(max_query_len, group)[0])

    def _checked_query(self, query, k_cache, v_cache, meta: AttentionMetadata, out):
        """forward's input checks (one clear error each, from shapes and host ints only);
        returns query with a contiguous last dim and the output buffer (`out` checked, or a
        new one)."""
        _check_cache(k_cache, v_cache)
        _check_runnable(query, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                        meta.query_start_loc)
        _check_dtype("query", query)
        if query.dim() != 3 or query.shape[2] != k_cache.shape[3]:
            raise ValueError(f"query must be (num_tokens, num_heads, {k_cache.shape[3]}), "
                             f"got {tuple(query.shape)}")
        num_tokens, num_heads, head_dim = query.shape
        num_kv_heads = k_cache.shape[2]
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of "
                             f"num_kv_heads={num_kv_heads}")
        num_seqs = meta.num_seqs
        if tuple(meta.query_start_loc.shape) != (num_seqs + 1,) \
                or meta.block_tables.dim() != 2 or meta.block_tables.shape[0] != num_seqs:
            raise ValueError(
                f"metadata for {num_seqs} sequences needs query_start_loc ({num_seqs + 1},) and "
                f"block_tables ({num_seqs}, max_blocks); got {tuple(meta.query_start_loc.shape)} "
                f"and {tuple(meta.block_tables.shape)}")
        # O(1) host check (the kernels trust the metadata; a span past the end of query would
        # read and write out of bounds). The full per-span checks would cost a sync or O(seqs).
        starts = meta.query_start_loc_cpu
        if starts is not None and (starts[0] != 0 or starts[-1] > num_tokens):
            raise ValueError(f"query_start_loc must run from 0 to at most num_tokens="
                             f"{num_tokens}, got {starts[0]}..{starts[-1]}")
        for name in ("query_start_loc", "seq_lens", "block_tables"):
            if getattr(meta, name).is_floating_point():
                raise ValueError(f"meta.{name} must be an integer tensor")

        query = _last_dim_contiguous(query)
        if out is None:
            out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        elif out.shape != query.shape or out.dtype != query.dtype or out.device != query.device \
                or out.stride(-1) != 1:
            raise ValueError(f"out must match query {tuple(query.shape)} {query.dtype} on "
                             f"{query.device} with a contiguous last dim, got "
                             f"{tuple(out.shape)} {out.dtype} on {out.device}")
        return query, out

    def _launch_sizes(self, query, k_cache, meta: AttentionMetadata) -> dict:
        """The tile sizes, split count, warps and split counters of a launch (keywords of
        paged_attention / rotary_decode_attention), from host ints only."""
        num_tokens, num_heads, head_dim = query.shape
        num_kv_heads = k_cache.shape[2]
        block_q, block_m = self._query_tiling(meta.max_query_len, num_heads // num_kv_heads)
        num_splits = self._num_splits(meta, num_kv_heads, query.device)
        counters = None
        if num_splits > 1 and self.fused_split_reduce:
            counters = self._counters(query.device, split_counter_slots(
                num_tokens, meta.num_seqs, num_kv_heads, block_q))
        return dict(block_q=block_q, block_m=block_m,
                    tile_n=self.tile_n or _default_tile_n(head_dim, meta.max_query_len,
                                                          meta.num_seqs),
                    num_splits=num_splits,
                    num_warps=8 if block_m * head_dim >= 128 * 128 else 4,
                    split_counters=counters)

    def _counters(self, device: torch.device, slots: int) -> torch.Tensor:
        """A zeroed int32 tensor of at least `slots` entries (at least 4096) on `device`."""
        kept = self._split_counters.setdefault(device, [])
        if not kept or kept[-1].numel() < slots:
            kept.append(torch.zeros(max(slots, 4096), dtype=torch.int32, device=device))
        return kept[-1]

    def _query_tiling(self, max_query_len: int, group: int) -> tuple[int, int]:
        """(BLOCK_Q tokens, BLOCK_M rows) per program; BLOCK_Q * group <= BLOCK_M.

        Decode gets BLOCK_Q as small as tl.dot's 16-row minimum allows; longer spans get up to
        max_block_m rows so each K/V tile is reused across many queries. The few distinct
        values (powers of two) bound the number of compiled variants.
        """
        want_q = min(triton.next_power_of_2(max(1, max_query_len)),
                     max(1, self.max_block_m // group))
        block_m = max(16, triton.next_power_of_2(want_q * group))
        return block_m // group, block_m

    def _num_splits(self, meta: AttentionMetadata, num_kv_heads: int, device) -> int:
        """Split-KV count: > 1 only when decode-like spans would leave most SMs idle.

        Uses Python ints only. Under CUDA graphs the count is frozen at capture, from the
        capture's num_seqs and max_seq_len: capture with max_seq_len = max_model_len so long
        contexts get split (splits past a short sequence's end return at once). The kernel is
        correct for any count; speed differs, and so do the roundings (the split boundaries
        move with the count). Decode (one-token spans) also caps the count by the context
        length (>= 64 keys a split). Verify-like spans (2..8 tokens) do not: their count then
        depends on the batch alone, the same eager (a verify with fewer drafts runs eagerly)
        as in the captured graph of that batch, so a row's numerics do not change with the
        sequence length crossing 128, 256, 512... keys (stop 10 review). What remains: the
        documented doublings of the tiles per split (paged_attention.py), and an eager batch
        whose count differs from its padded graph size's.
        """
        if self.num_kv_splits is not None:
            return self.num_kv_splits
        if device.type != "cuda" or meta.max_query_len > _SPLIT_MAX_QUERY_LEN:
            return 1
        work = meta.num_seqs * num_kv_heads  # programs doing real work without splitting
        sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
        if work >= sms:
            return 1
        splits = min(_MAX_SPLITS, triton.cdiv(2 * sms, work))
        if meta.max_query_len == 1:
            splits = min(splits, meta.max_seq_len // _MIN_KEYS_PER_SPLIT)
        return _prev_power_of_2(splits) if splits >= 2 else 1


# ---------------------------------------------------------------------- validation helpers

def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must both be (num_blocks, block_size, "
                         f"num_kv_heads, head_dim), got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    _check_dtype("k_cache", k_cache)
    _check_dtype("v_cache", v_cache)
    block_size, head_dim = k_cache.shape[1], k_cache.shape[3]
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"the triton backend needs head_dim a power of two >= 16, got "
                         f"{head_dim}; use attention_backend='torch' for this model")
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("k_cache/v_cache must be contiguous along head_dim")


def _check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; the triton backend supports "
                         f"float16, bfloat16 and float32")


def _check_runnable(*tensors: torch.Tensor) -> None:
    """All tensors on one device, and that device is CUDA (or the triton interpreter is on)."""
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device:
            raise ValueError(f"attention tensors must share one device, got {device} and "
                             f"{t.device}")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"the triton attention backend needs CUDA tensors, got {device} "
                           f"(set TRITON_INTERPRET=1 before importing triton to test on CPU)")


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()
