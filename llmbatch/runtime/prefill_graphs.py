"""CUDA graphs for steps that prefill one sequence alone (batch-1 time to first token).

Why: a lone prompt's prefill (a batch-1 request, a prompt chunk, the rest of a prompt after a
prefix-cache hit) runs eagerly, and on the 1B shape an eager 512-token prefill is host-bound:
on the H200 (stop 20) its ~150 launches took 9-15 ms to enqueue while its kernels took ~3 ms
(engine stats: eager_launch_s equal to eager_step_s). This runner captures the forward once per
token bucket and replays it for any step that schedules exactly one sequence of n <= max tokens
(EngineConfig.prefill_graph_max_tokens; opt-in until measured on a GPU).
Steps of 1 or k + 1 tokens never get here: ModelRunner.forward_logits asks the decode / verify
graphs (cuda_graphs.py) first, and they take them (graph_steps, not prefill_graph_steps).

Padding is a second SEQUENCE, not extra tokens in the real span. The attention kernels place a
span's queries at seq_len - query_len + i, so tokens appended to the real span would shift its
positions; behind it, as a sequence of its own, they change nothing about it. A graph of Q
tokens therefore runs two spans:

    tokens      [ real span: n tokens          | padding: Q - n tokens            ]
    positions   [ ctx .. ctx + n - 1           | 0 ...                            ]
    slots       [ the request's slots          | -1 (never stored)                ]
    query_start_loc [0, n, Q]       seq_lens [ctx + n, Q - n]
    block_tables    [the request's table | a row of zeros (block 0: real, safe to read)]

The padding sequence attends to its own Q - n keys in block 0 (whatever they hold); its rows are
never read, and rows do not mix outside attention (norms, matmuls and rotary are row-wise).
n == Q leaves it empty (seq_len 0: its query tiles return at once).

Launch sizes frozen at capture: num_seqs 2, max_query_len Q, max_seq_len max_model_len. Spans of
more than 8 tokens are never split (triton_backend._num_splits), and the query tiling and key
tile depend on max_query_len only through powers of two (>= 16 rows for every bucket here),
so the real span's attention is launched as eagerly with n tokens: what can differ from the
eager step is cuBLAS's kernel choice for Q rows instead of n (float rounding, not results).

Buffer layout (device; one pinned int64 staging buffer mirrors `ints`, so a step is one
host-to-device copy plus its block-table row):
    ints:          int64, [input_ids Q | positions Q | slot_mapping Q | seq_lens 2 |
                   query_start_loc 3] for the graph of Q tokens (each graph views its offsets)
    seq_lens, query_start_loc: int32 (2,) and (3,), cast from `ints` inside the graph
    block_tables:  (2, max_blocks) int32; row 0 the request's table (columns past its width
                   keep stale ids: never read, they lie past seq_len), row 1 zeros forever
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import Optional, Sequence

import torch

from llmbatch.runtime.attention.backend import AttentionMetadata
from llmbatch.runtime.config import MIN_PREFILL_GRAPH_TOKENS as MIN_BUCKET
from llmbatch.runtime.graph_plumbing import (StagingFence, capture_after_warm_up,
                                             check_replay_close, fill_token_fields)

logger = logging.getLogger(__name__)


def prefill_buckets(max_tokens: int) -> list[int]:
    """Ascending token counts a graph is captured for: 16, 24, 32, 48, 64, 96, ... (powers of
    two and the midpoints between them, so a prompt pads by at most half again), up to
    max_tokens, which is always one of them."""
    if max_tokens < MIN_BUCKET:
        raise ValueError(f"max_tokens must be >= {MIN_BUCKET}, got {max_tokens}")
    sizes, p = {max_tokens}, MIN_BUCKET
    while p < max_tokens:
        sizes.update(s for s in (p, p + p // 2) if s <= max_tokens)
        p *= 2
    return sorted(sizes)


def _ints_len(q: int) -> int:
    """int64 elements of one graph's inputs: three per token, two seq_lens, three starts."""
    return 3 * q + 5


class PrefillGraphRunner:
    """Captures the model's forward for one-sequence steps at token buckets; replays it for
    qualifying steps.

    Build after the KV pool exists (the graphs bake in the cache pointers). CUDA only, as
    cuda_graphs.DecodeGraphRunner; capture=False builds the buffers only (on any device), for
    tests that drive _stage and _forward eagerly on CPU to check the padding logic.
    """

    def __init__(self, model, kv_caches, attn_backend, *, max_tokens: int, max_model_len: int,
                 block_size: int, device: torch.device,
                 buckets: Optional[Sequence[int]] = None, capture: bool = True) -> None:
        if capture and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.model, self.kv_caches, self.attn_backend = model, kv_caches, attn_backend
        self.device = device
        self.max_model_len = max_model_len
        self.buckets = sorted(set(buckets)) if buckets else prefill_buckets(max_tokens)
        self.max_blocks = -(-max_model_len // block_size)
        self.num_replays = 0
        q_max = self.buckets[-1]
        i32, i64 = torch.int32, torch.int64
        self._ints = torch.zeros(_ints_len(q_max), dtype=i64, device=device)
        self._seq_lens = torch.zeros(2, dtype=i32, device=device)
        self._query_start_loc = torch.zeros(3, dtype=i32, device=device)
        self._block_tables = torch.zeros(2, self.max_blocks, dtype=i32, device=device)
        on_cuda = device.type == "cuda"
        self._host_ints = torch.zeros(_ints_len(q_max), dtype=i64, pin_memory=on_cuda)
        self._host_bt = torch.zeros(self.max_blocks, dtype=i32, pin_memory=on_cuda)
        # The pinned staging is rewritten only once the previous step's copies have read it.
        self._fence = StagingFence(on_cuda)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}   # (Q, hidden), graph-owned
        if capture:
            self.capture()

    # ------------------------------------------------------------------ which steps

    def bucket_for(self, step) -> Optional[int]:
        """The bucket Q a step (StepInputs) replays at, or None to run it eagerly: exactly one
        sequence, n <= the largest bucket, a block table the graph's buffer holds."""
        if len(step.seq_lens) != 1:
            return None
        i = bisect.bisect_left(self.buckets, len(step.input_ids))
        if i == len(self.buckets) or len(step.block_tables[0]) > self.max_blocks:
            return None
        return self.buckets[i]

    # ------------------------------------------------------------------ inputs

    def _stage(self, input_ids: list[int], positions: list[int], slot_mapping: list[int],
               seq_len: int, block_table: list[int], q: int) -> None:
        """Fill the pinned staging for one span of n = len(input_ids) <= q tokens plus the
        padding sequence, and enqueue the device copies."""
        n = len(input_ids)
        if not (len(positions) == len(slot_mapping) == n <= q):
            raise ValueError(f"a span of at most {q} tokens with one position and slot each, "
                             f"got {n}, {len(positions)} and {len(slot_mapping)}")
        self._fence.wait()
        ints = self._host_ints[:_ints_len(q)].numpy()
        fill_token_fields(ints, ((input_ids, 0), (positions, 0), (slot_mapping, -1)), n, q)
        ints[3 * q:3 * q + 5] = (seq_len, q - n, 0, n, q)   # seq_lens, then query_start_loc
        width = len(block_table)
        if width:
            self._host_bt[:width].numpy()[:] = block_table
        self._ints[:_ints_len(q)].copy_(self._host_ints[:_ints_len(q)], non_blocking=True)
        if width:
            self._block_tables[0, :width].copy_(self._host_bt[:width], non_blocking=True)
        self._fence.copied()

    def _forward(self, q: int) -> torch.Tensor:
        """The captured body: the model over the two spans of the persistent buffers."""
        ints = self._ints
        self._seq_lens.copy_(ints[3 * q:3 * q + 2])           # int64 -> int32, in the graph
        self._query_start_loc.copy_(ints[3 * q + 2:3 * q + 5])
        meta = AttentionMetadata(
            slot_mapping=ints[2 * q:3 * q],
            query_start_loc=self._query_start_loc,
            seq_lens=self._seq_lens,
            block_tables=self._block_tables,
            max_query_len=q,
            max_seq_len=self.max_model_len,
            query_start_loc_cpu=None,   # unknown at capture; the Triton backend does not need it
            seq_lens_cpu=None,
        )
        return self.model(ints[:q], ints[q:2 * q], self.kv_caches, meta, self.attn_backend)

    # ------------------------------------------------------------------ capture

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first, into one memory pool of their own (the smaller
        graphs reuse the largest one's activations; the decode graphs keep theirs)."""
        start = time.perf_counter()
        with torch.cuda.device(self.device):
            pool = torch.cuda.graph_pool_handle()
            for q in reversed(self.buckets):
                # Dummy inputs that write nothing (slot -1 everywhere): a real span of q // 2
                # tokens over block 0 and the padding sequence behind it.
                half = q // 2
                self._stage([0] * half, list(range(half)), [-1] * half, half, [0], q)
                graph, out, eager = capture_after_warm_up(
                    lambda: self._forward(q), pool)
                self._graphs[q], self._outputs[q] = graph, out
                self._check_replay(q, eager[:half])
            torch.cuda.synchronize()
        logger.info("captured %d prefill CUDA graphs (one sequence, %d..%d tokens) in %.1f s",
                    len(self.buckets), self.buckets[0], self.buckets[-1],
                    time.perf_counter() - start)

    def _check_replay(self, q: int, eager_real_rows: torch.Tensor) -> None:
        """The first replay, on the same inputs, must match the eager forward on the real
        span's rows (the padding rows read garbage keys and are never used): a kernel that does
        not survive capture shows up here, at start-up, not as wrong tokens later."""
        self._graphs[q].replay()
        torch.cuda.synchronize(self.device)
        check_replay_close(self._outputs[q][:eager_real_rows.shape[0]], eager_real_rows,
                           f"prefill CUDA graph replay ({q} tokens)")

    # ------------------------------------------------------------------ replay

    def run(self, step, deferred=None) -> Optional[torch.Tensor]:
        """Replay for a qualifying step: (n, hidden_size) hidden states of its n tokens, a view
        into graph-owned memory valid until the next prefill replay. None: run it eagerly (also
        for a step with deferred input tokens, which async scheduling gives decode rows only)."""
        if deferred is not None:
            return None
        q = self.bucket_for(step)
        if q is None:
            return None
        self._stage(step.input_ids, step.positions, step.slot_mapping, step.seq_lens[0],
                    step.block_tables[0], q)
        self._graphs[q].replay()
        self.num_replays += 1
        return self._outputs[q][:len(step.input_ids)]
