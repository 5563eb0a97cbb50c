"""Micro-benchmark of the Triton attention kernels on the 1B shape (GPU only; not a test).

    python -m llmbatch.runtime.attention.triton_kernels.bench_attention [--block-size 16]

Prints one line per scenario: time per call, achieved KV-read bandwidth (decode) or attention
TFLOP/s (prefill), against the card's copy bandwidth measured here. Use it to tune
TritonAttentionBackend's tile sizes and split heuristic; the end-to-end numbers live in bench/.
"""

from __future__ import annotations

import argparse
import random

import torch

from llmbatch.runtime.attention.backend import AttentionMetadata
from llmbatch.runtime.attention.triton_backend import TritonAttentionBackend

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 64  # Llama-3.2-1B


def build(spans, block_size, dtype, device, seed=0):
    """(query, k_cache, v_cache, meta) for spans of (num_cached_tokens, query_len)."""
    rng = random.Random(seed)
    seq_lens = [c + q for c, q in spans]
    pages = [-(-n // block_size) for n in seq_lens]
    ids = list(range(sum(pages)))
    rng.shuffle(ids)  # scattered pages, as a long-running pool has them
    table = torch.zeros(len(spans), max(pages), dtype=torch.int32)
    slots, starts = [], [0]
    for i, ((cached, q), n) in enumerate(zip(spans, seq_lens)):
        own = [ids.pop() for _ in range(pages[i])]
        table[i, :len(own)] = torch.tensor(own, dtype=torch.int32)
        slots += [own[p // block_size] * block_size + p % block_size for p in range(cached, n)]
        starts.append(starts[-1] + q)
    cache_shape = (sum(pages), block_size, KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(cache_shape, dtype=dtype, device=device)
    v_cache = torch.randn(cache_shape, dtype=dtype, device=device)
    query = torch.randn(starts[-1], HEADS, HEAD_DIM, dtype=dtype, device=device)
    meta = AttentionMetadata(
        torch.tensor(slots, device=device), torch.tensor(starts, dtype=torch.int32, device=device),
        torch.tensor(seq_lens, dtype=torch.int32, device=device), table.to(device),
        max(q for _, q in spans), max(seq_lens), starts, seq_lens)
    return query, k_cache, v_cache, meta


def kv_bytes(spans, elem):
    return sum(c + q for c, q in spans) * KV_HEADS * HEAD_DIM * 2 * elem


def attn_flops(spans):
    # QK^T and PV: 2 matmuls x 2 FLOPs per MAC, over each query row's visible keys.
    visible = sum(q * c + q * (q + 1) // 2 for c, q in spans)
    return 4 * HEADS * HEAD_DIM * visible


def scenarios(rng):
    return {
        "decode b=1 ctx=1024 (W-BATCH1)": [(1023, 1)],
        "decode b=8 ctx=4096": [(4095, 1)] * 8,
        "decode b=64 ctx~U[128,1536]": [(rng.randint(128, 1536), 1) for _ in range(64)],
        "decode b=256 ctx~U[128,1536] (W-RANDOM)": [(rng.randint(128, 1536), 1)
                                                    for _ in range(256)],
        "spec k+1=5 b=8 ctx=600": [(600, 5)] * 8,
        "prefill 8 x 1024": [(0, 1024)] * 8,
        "suffix 64 x 96 after 1024 cached (W-PREFIX)": [(1024, 96)] * 64,
    }


def main() -> None:
    import triton.testing

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--sweep", action="store_true",
                        help="also try other key tiles (tile_n 32/128) and query tiles "
                             "(max_block_m 128) beside the defaults")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention needs a CUDA device")
    dtype = getattr(torch, args.dtype)
    device = torch.device("cuda")
    big = torch.empty(1 << 28, dtype=torch.uint8, device=device)
    copy_ms = triton.testing.do_bench(lambda: big.clone())
    copy_bw = 2 * big.numel() / copy_ms / 1e6  # GB/s, read + write
    print(f"{torch.cuda.get_device_name()}  block_size={args.block_size} {args.dtype}  "
          f"copy {copy_bw:,.0f} GB/s")
    rng = random.Random(0)
    for name, spans in scenarios(rng).items():
        query, k_cache, v_cache, meta = build(spans, args.block_size, dtype, device)
        scale = HEAD_DIM ** -0.5
        auto_splits = None
        variants = [("auto", TritonAttentionBackend()),
                    ("nosplit", TritonAttentionBackend(num_kv_splits=1))]
        if args.sweep:
            variants += [("tile32", TritonAttentionBackend(tile_n=32)),
                         ("tile128", TritonAttentionBackend(tile_n=128)),
                         ("bm128", TritonAttentionBackend(max_block_m=128))]
        for label, backend in variants:
            splits = backend._num_splits(meta, KV_HEADS, device)
            if label == "nosplit" and splits == auto_splits:
                continue
            if label == "bm128" and meta.max_query_len <= 8:
                continue  # decode tiles never reach 64 rows: same launch as auto
            try:
                ms = triton.testing.do_bench(
                    lambda: backend.forward(query, k_cache, v_cache, meta, scale))
            except Exception as exc:  # one bad variant must not hide the others
                print(f"{name:46s} {label:8s} FAILED {type(exc).__name__}: {exc}")
                continue
            gbs = kv_bytes(spans, query.element_size()) / ms / 1e6
            tflops = attn_flops(spans) / ms / 1e9
            print(f"{name:46s} {label:8s} splits={splits:2d} {ms * 1e3:9.1f} us  "
                  f"KV {gbs:7,.0f} GB/s ({gbs / copy_bw:4.0%} of copy bw)  "
                  f"{tflops:6.1f} TFLOP/s")
            if label == "auto":
                auto_splits = splits


if __name__ == "__main__":
    main()
