"""The physical floor of a workload on a card: the time no implementation can beat (BENCH.md).

Counting (BENCH.md, "The floor"):
- Prefill computes each DISTINCT prompt token once (ideal prefix caching: the tokens of the
  prompt trie), FLOPs = 2 x non-embedding params per token + attention; bytes = weights read
  once + the K/V written. Prefill time = max(FLOPs / peak FLOP/s, bytes / bandwidth).
- Decode is step by step: output token j of every request with more than j outputs shares step j
  (all requests decode together, the best a batch can do). A step costs
  FLOPs = 2 x params x batch + attention, bytes = weights + KV read (kv bytes/token x context),
  and takes max(FLOPs / peak, bytes / bandwidth). The context of output token j of a request with
  prompt length L is L + j tokens.
- Attention FLOPs: 4 x layers x heads x head_dim per (query, key) pair (QK^T and PV, 2 each).
For W-RANDOM on an H200 (806 TFLOP/s, 4.28 TB/s) this gives prefill 0.37 s + decode 0.73 s.

Ceilings are measured on the device itself (`measure_ceilings`): a device-to-device copy (bytes
counted read + write) and a square matmul in the run's dtype. On a CPU the same measurement runs
and is labelled as CPU: a CPU floor is only a smoke-test figure.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from bench.model_shapes import ModelShape


@dataclass
class Ceilings:
    device: str             # e.g. "cuda: NVIDIA H200" or "cpu"
    dtype: str
    bandwidth_bytes_per_s: float   # copy bandwidth, read + write
    flops_per_s: float             # dense matmul in `dtype`

    def to_dict(self) -> dict:
        return asdict(self)


def _timed(fn, sync, repeats: int) -> float:
    """Best-of wall time of fn() after one warm-up call."""
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_ceilings(device: str, dtype: str) -> Ceilings:
    """Copy bandwidth and matmul FLOP/s on `device` (~1 s on a GPU, ~2 s on a CPU)."""
    import torch

    dev = torch.device(device)
    tdtype = getattr(torch, dtype)
    on_gpu = dev.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(dev)) if on_gpu else (lambda: None)
    nbytes = (1 << 30) if on_gpu else (64 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev).fill_(1)
    dst = torch.empty_like(src)
    inner = 10 if on_gpu else 2                # copies per timing, to dwarf launch overhead

    def copy():
        for _ in range(inner):
            dst.copy_(src)
    t_copy = _timed(copy, sync, repeats=5)
    bandwidth = 2 * nbytes * inner / t_copy    # read + write, as BENCH.md counts it
    del src, dst

    n = 8192 if on_gpu else 512
    a = torch.randn(n, n, device=dev).to(tdtype)
    b = torch.randn(n, n, device=dev).to(tdtype)

    def matmul():
        for _ in range(inner):
            torch.mm(a, b)
    t_mm = _timed(matmul, sync, repeats=5)
    flops = 2 * n ** 3 * inner / t_mm
    name = f"cuda: {torch.cuda.get_device_name(dev)}" if on_gpu else "cpu"
    return Ceilings(name, dtype, bandwidth, flops)


def count_unique_prefill(prompts: list[list[int]]) -> tuple[int, int]:
    """(distinct prompt tokens, sum of their context lengths) over the prompts' trie.

    A trie node at depth p (0-based) is one token computed once with p + 1 keys in its context.
    """
    root: dict = {}
    num_nodes = 0
    context_sum = 0
    for prompt in prompts:
        node = root
        for depth, tok in enumerate(prompt):
            child = node.get(tok)
            if child is None:
                child = node[tok] = {}
                num_nodes += 1
                context_sum += depth + 1
            node = child
    return num_nodes, context_sum


def workload_floor(prompt_lens: list[int], output_lens: list[int], shape: ModelShape,
                   dtype_bytes: int, ceilings: Ceilings,
                   prompts: list[list[int]] | None = None) -> dict:
    """Floor seconds of one workload; `prompts` (token ids) enable ideal prefix sharing."""
    if len(prompt_lens) != len(output_lens) or not prompt_lens:
        raise ValueError("prompt_lens and output_lens must be non-empty and of equal length")
    F, B = ceilings.flops_per_s, ceilings.bandwidth_bytes_per_s
    weight_bytes = shape.num_params * dtype_bytes
    kv_per_token = shape.kv_bytes_per_token(dtype_bytes)
    attn_per_pair = 4 * shape.num_hidden_layers * shape.num_attention_heads * shape.head_dim

    if prompts is not None:
        prefill_tokens, prefill_ctx = count_unique_prefill(prompts)
    else:
        prefill_tokens = sum(prompt_lens)
        prefill_ctx = sum(n * (n + 1) // 2 for n in prompt_lens)
    prefill_flops = 2 * shape.num_non_embedding_params * prefill_tokens \
        + attn_per_pair * prefill_ctx
    prefill_bytes = weight_bytes + kv_per_token * prefill_tokens
    prefill_s = max(prefill_flops / F, prefill_bytes / B)

    # Step j: every request with output length > j decodes its token j with context L + j.
    step_s: list[float] = []
    decode_flops = decode_bytes = 0
    reqs = sorted(zip(output_lens, prompt_lens), reverse=True)   # longest outputs first
    active = len(reqs)
    ctx_sum = sum(p for _, p in reqs)          # sum of L + j over active requests at step j
    for j in range(reqs[0][0]):
        while active and reqs[active - 1][0] <= j:       # requests done before step j leave
            active -= 1
            ctx_sum -= reqs[active][1] + j
        flops = 2 * shape.num_params * active + attn_per_pair * ctx_sum
        nbytes = weight_bytes + kv_per_token * ctx_sum
        step_s.append(max(flops / F, nbytes / B))
        decode_flops += flops
        decode_bytes += nbytes
        ctx_sum += active                        # each active context grows by one token
    decode_s = sum(step_s)
    num_out = sum(output_lens)
    total_s = prefill_s + decode_s
    return {
        "prefill_tokens": prefill_tokens, "prefill_flops": prefill_flops,
        "prefill_bytes": prefill_bytes, "prefill_s": prefill_s,
        "decode_steps": len(step_s), "decode_flops": decode_flops,
        "decode_bytes": decode_bytes, "decode_s": decode_s,
        "total_s": total_s, "output_tokens": num_out,
        "out_tok_per_s": num_out / total_s,
        # Time per output token after the first, for one request (W-BATCH1).
        "tpot_s": (sum(step_s[1:]) / (len(step_s) - 1)) if len(step_s) > 1 else None,
    }


def fraction_of_floor(floor_s: float, measured_s: float) -> float:
    """1.0 means at the physical limit; a measured time below the floor means a counting bug."""
    if measured_s <= 0:
        raise ValueError(f"measured time must be > 0, got {measured_s}")
    return floor_s / measured_s
