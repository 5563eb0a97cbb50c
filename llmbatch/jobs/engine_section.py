"""The job file's `engine` section: runtime settings, checked at load time (exit 2)."""

from __future__ import annotations

import re
from typing import Literal, Optional

from pydantic import Field, field_validator

from llmbatch.jobs.section_base import Float, Int
from llmbatch.jobs.section_base import Section as _Section
from llmbatch.runtime.config import MAX_PREFILL_GRAPH_TOKENS, MIN_PREFILL_GRAPH_TOKENS


class EngineSection(_Section):
    device: str = "auto"                 # auto | cpu | cuda | cuda:N (runtime/device.py)
    block_size: Int = 16
    max_num_seqs: Int = 256
    max_num_batched_tokens: Int = 8192
    gpu_memory_utilization: Float = 0.9
    kv_cache_blocks: Optional[Int] = None
    prefix_caching: bool = True
    ordering: Literal["prefix", "input"] = "prefix"
    attention_backend: Literal["auto", "torch", "triton"] = "auto"
    cuda_graphs: bool = True
    # Decode / verify graphs of <= 16 tokens also run the LM head and greedy argmax
    # (runtime/graph_logits.py); the same tokens at batch 1. Unmeasured on a GPU (stop 23).
    graph_logits: bool = True
    fused_kernels: bool = True   # measured on an H200: 1.5x W-RANDOM (bench/RESULTS.md)
    # Plan step n+1 while step n runs on the GPU (docs/async_scheduling.md). null (auto): on
    # for CUDA at TP 1 (H200: 1.34x W-RANDOM, bench/RESULTS.md); steps that verify
    # speculative drafts (small batches) run synchronously.
    async_scheduling: Optional[bool] = None
    # nf4 layers on our Triton w4a16 GEMM instead of bitsandbytes; slower so far (RESULTS.md).
    nf4_triton_gemm: bool = False
    # Fused Triton matmuls for decode steps of <= 16 tokens (CUDA, TP 1, dense); slower than
    # cuBLAS at 2-16 tokens on an H200 (W-RANDOM 0.93x, bench/RESULTS.md stop 17): opt-in.
    skinny_matmul: bool = False
    # One-token steps on our one-row Triton GEMVs with fused norms / epilogues. null (auto): on
    # for CUDA, TP 1, dense weights (H200: W-BATCH1 TPOT 1.127 -> 1.054 ms, stop 17).
    skinny_gemv: Optional[bool] = None
    # sm_90+: our Triton kernels use programmatic dependent launch. null (auto): on for sm_90+
    # (H200: 1.02-1.03x at batch 1, the same tokens, stops 13 and 17).
    pdl: Optional[bool] = None
    # Touch the small matmuls' weights into L2 ahead of use at small batch; unmeasured.
    l2_prefetch: bool = False
    # With the gemv layers: what each gemv program reads of its weights before its PDL wait.
    # null (auto): "tile" with PDL (H200: 1.025x at batch 1, the same tokens, stop 19).
    gemv_weight_prefetch: Optional[Literal["off", "tile", "l2", "both"]] = None
    # Decode steps rotate q/k, store K/V and attend in one launch. null (auto): on for the
    # triton backend with fused kernels on CUDA (H200: 1.02x at batch 1, stop 19).
    rotary_in_attention: Optional[bool] = None
    # With the gemv layers: steps of up to this many tokens (2..8: speculative verify steps,
    # small decode batches) on the multi-row gemv kernel, not cuBLAS. 1: one-token steps only.
    # Opt-in: never measured on a GPU (stop 20).
    gemv_max_rows: Int = Field(default=1, ge=1, le=8)
    # Steps that prefill exactly one sequence of up to this many tokens (batch-1 TTFT) replay
    # a CUDA graph per token bucket (runtime/prefill_graphs.py). 0: off; else 16..8192.
    # Opt-in: never measured on a GPU (stop 20).
    prefill_graph_max_tokens: Int = 0
    # null or 0: the model's max_position_embeddings; longer than that runs with the model's,
    # with a warning. 0 and longer values stay valid (and hashed as written): folders written
    # with them must resume.
    max_model_len: Optional[Int] = Field(default=None, ge=0)
    planner_window: Int = 4096
    cpu_kv_cache_bytes: Optional[Int] = None

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        # Checked here so a typo is exit 2 at load time; torch.device() would raise a
        # RuntimeError (an internal error) only once the model starts loading.
        if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", value):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return value

    @field_validator("max_model_len")
    @classmethod
    def _room_for_an_output_token(cls, value: Optional[int]) -> Optional[int]:
        # 1 was accepted and made every row an error row (no room for an output token).
        if value == 1:
            raise ValueError("must be 0 or null (the model's own context length) or >= 2: a "
                             "row needs a prompt token and an output token")
        return value

    @field_validator("prefill_graph_max_tokens")
    @classmethod
    def _prefill_graph_tokens(cls, value: int) -> int:
        # 1..15 too: the buckets start at 16 (the attention kernels' smallest query tile).
        if value != 0 and not MIN_PREFILL_GRAPH_TOKENS <= value <= MAX_PREFILL_GRAPH_TOKENS:
            raise ValueError(f"must be 0 (off) or {MIN_PREFILL_GRAPH_TOKENS}.."
                             f"{MAX_PREFILL_GRAPH_TOKENS}, got {value}")
        return value
