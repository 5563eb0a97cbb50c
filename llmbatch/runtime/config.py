"""EngineConfig: everything the runtime needs, validated on construction (no torch)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from typing import Optional

ATTENTION_BACKENDS = ("auto", "torch", "triton")
ORDERINGS = ("prefix", "input")
DTYPES = ("auto", "float32", "float16", "bfloat16")
QUANTIZATION_METHODS = ("none", "int8", "nf4")
SPECULATIVE_METHODS = ("none", "ngram", "draft")
GEMV_WEIGHT_PREFETCH = ("off", "tile", "l2", "both")
# layers/gemv_rows.py's GEMV_MAX_ROWS (that module imports triton; this one must not)
GEMV_MAX_ROWS = 8
# The largest count setting (max_num_seqs, planner_window, ...): int32, far past any real use.
MAX_COUNT = 2**31 - 1
# prefill_graph_max_tokens: 0 or in this range (runtime/prefill_graphs.py's buckets start at 16,
# the attention kernels' smallest query tile).
MIN_PREFILL_GRAPH_TOKENS = 16
MAX_PREFILL_GRAPH_TOKENS = 8192


class EngineConfigError(ValueError):
    """A setting the resolved model or device cannot honour, found once they are known (the
    model's context length, the device type). A ValueError like every other refused setting;
    its own type lets the job layer name it as a setting, not as a model that fails to load."""


@dataclass
class EngineConfig:
    model: str                                  # local checkpoint dir (or HF id when a hub is reachable)
    dtype: str = "auto"                         # auto: bf16 on CUDA, float32 on CPU
    device: str = "auto"                        # auto | cpu | cuda | cuda:N
    trust_remote_code: bool = False
    tokenizer: Optional[str] = None             # defaults to `model`
    max_model_len: Optional[int] = None         # defaults to the model's max_position_embeddings
    block_size: int = 16                        # tokens per KV block
    max_num_seqs: int = 256                     # running requests per step
    max_num_batched_tokens: int = 8192          # token budget per step
    gpu_memory_utilization: float = 0.9         # fraction of the GPU the KV pool may fill up to
    kv_cache_blocks: Optional[int] = None       # fixed pool size; overrides memory sizing
    cpu_kv_cache_bytes: int = 1 << 30           # pool budget when running on CPU
    prefix_caching: bool = True
    ordering: str = "prefix"                    # prefix: DFS order of the prompt trie; input: as given
    planner_window: int = 4096                  # requests the planner reorders at a time
    attention_backend: str = "auto"             # auto: triton on CUDA, torch otherwise
    cuda_graphs: bool = True
    # Decode / verify graphs of <= 16 tokens also run the LM head and the greedy argmax
    # (runtime/graph_logits.py): 3 device operations fewer between replays; at batch 1 the
    # same tokens (a padded batch runs the LM head at the padded size, like its layers).
    # ~24 MB of graph-owned logits outside the KV budget. False: the LM head runs eagerly.
    graph_logits: bool = True
    fused_kernels: bool = True                  # Triton RMSNorm, SiLU·mul, rotary; CUDA only
    # Opt-in: decode steps of <= 16 tokens run each Llama-family layer as 6 launches
    # (layers/skinny_matmul.py: norm prologues, residual and SiLU·mul epilogues); needs
    # fused_kernels on CUDA, tensor_parallel_size 1, no quantization. Untuned: off by default.
    skinny_matmul: bool = False
    # One-token steps (batch-1 decode) run each Llama-family layer on layers/gemv.py's one-row
    # kernels (RMSNorm prologue, residual / SiLU·mul epilogues: 7 launches a layer instead of
    # 10). None (auto): on for CUDA with fused_kernels, tensor_parallel_size 1 and dense
    # weights; measured on an H200 (stop 17): W-BATCH1 TPOT 1.127 -> 1.054 ms on one engine.
    # Steps of 2+ tokens keep the unfused layers unless skinny_matmul is on too. False: off;
    # True: on where it can apply, logged where it cannot.
    skinny_gemv: Optional[bool] = None
    # Our Triton kernels (RMSNorm, SiLU·mul, rotary, attention, the split reduce, skinny, gemv)
    # use programmatic dependent launch on Hopper (sm_90+): each may start while the previous
    # one drains. None (auto): on for sm_90+ CUDA with fused_kernels and a Triton that has PDL
    # launches (launch_pdl, gdc_wait; kernel_paths checks); measured on an H200 in
    # stops 13 and 17: W-BATCH1 1.02-1.03x, W-RANDOM 1.02x, W-PREFIX 1.00x, the same tokens.
    # False: off; True: on where it can apply, logged where it cannot.
    pdl: Optional[bool] = None
    # Opt-in: steps of <= 16 tokens touch each layer's qkv and o_proj weights into L2 on a side
    # stream while the cheap kernels before them run (models/llama_prefetch.py); CUDA, fused
    # kernels, dense weights, not with skinny_matmul. Unmeasured: bench --l2-prefetch.
    l2_prefetch: bool = False
    # With the gemv layers: what each gemv program reads of its weights before its PDL wait,
    # overlapping the previous kernel (the weights are written by no decode kernel): "tile"
    # its first weight tile into registers (layers/gemv.py set_weight_prefetch), "l2" its
    # whole slice into L2 (set_weight_prefetch_l2, CUDA), "both", or "off". None (auto):
    # "tile" where the gemv layers and PDL are on (without PDL there is no wait to overlap).
    # Measured on an H200 in stop 19 (bench_batch1): "tile" 0.948 vs 0.972 ms at batch 1
    # (1.025x, the same tokens), "l2" 0.90x (slower).
    gemv_weight_prefetch: Optional[str] = None
    # With the gemv layers: steps of up to this many tokens (1..8) run them on gemv_linear,
    # the multi-row kernel above one (layers/gemv_rows.py: each weight tile loaded once for
    # all rows; LM head calls too); a batch-1 speculative verify step is k + 1 tokens. 1 (the
    # default): one-token steps only, as before. Opt-in: UNMEASURED on a GPU (bench
    # --gemv-rows8); the start-up check (models/gemv_check.py) launches each row padding.
    gemv_max_rows: int = 1
    # Decode and speculative-verify-like steps (spans of <= 8 tokens, each one query tile of
    # the attention launch) rotate q and k, store K/V and attend in one launch
    # (attention/triton_kernels/rotary_decode.py) instead of two (fused rotary + store, then
    # attention): a launch fewer a layer. Spans > 1 token (verify) UNMEASURED on a GPU.
    # Needs the triton attention backend and fused_kernels on CUDA. None (auto): on where it applies, silently off elsewhere; True: logged where it
    # cannot apply; False: off. Measured on an H200 in stop 19: W-BATCH1 0.96 vs 0.97 ms
    # (1.02x; bench_batch1 1.015x), W-RANDOM 1.07x, W-PREFIX 1.00x; greedy equal to
    # transformers in tests/gpu (its bf16 roundings differ from the two launches': no FMA
    # contraction in its attention, so tokens differ from the two-launch path's).
    rotary_in_attention: Optional[bool] = None
    # Steps that prefill ONE sequence of up to this many tokens (a batch-1 prompt, a chunk,
    # the rest after a prefix hit) replay a CUDA graph captured per token bucket (16, 24, 32,
    # 48, ... up to this; runtime/prefill_graphs.py) instead of ~150 eager launches: on the
    # H200 an eager 512-token prefill of the 1B shape was host-bound (9-15 ms to enqueue, ~3 ms
    # of kernels). Needs cuda_graphs on CUDA with the triton backend at tp 1. 0: off.
    # Opt-in: UNMEASURED on a GPU (bench --prefill-graphs); limited to the token budget and
    # max_model_len at start-up. The graphs' memory pool (the largest bucket's activations,
    # ~40 MB at 512 tokens on the 1B shape) is not counted in the KV budget: it comes out of
    # the 1 - gpu_memory_utilization headroom, like the decode graphs'.
    prefill_graph_max_tokens: int = 0
    tensor_parallel_size: int = 1
    quantization: str = "none"
    # Also quantize the token embedding and LM head with the engine's quantization (nf4 only):
    # saves most of their memory (the tied 128256 x 2048 table of Llama-3.2-1B: 525 MB bf16 ->
    # 148 MB) at some accuracy cost. transformers and vLLM leave them unquantized, hence opt-in.
    quantize_embeddings: bool = False
    # Opt-in: nf4 layers compute with the Triton w4a16 GEMM (layers/nf4_matmul.py) instead of
    # bitsandbytes. Measured on an H200 (bench/RESULTS.md, stop 9) it is slower: W-RANDOM
    # 2,348 tok/s and TPOT 6.8 ms, against 28,285 and 1.14 ms with bitsandbytes; off until tuned.
    nf4_triton_gemm: bool = False
    # A PEFT LoRA adapter folder (or Hub id) merged into the weights at load
    # (runtime/lora_merge.py): one adapter for the whole run, at no cost per step.
    lora: Optional[str] = None
    # Overlap the host with the GPU: schedule and launch step n+1 while step n runs
    # (docs/async_scheduling.md). None (auto): on for CUDA engines at tp 1 (H200: 1.34x
    # W-RANDOM, 1.41x W-PREFIX, 1.12x W-BATCH1, same tokens), off elsewhere (a CPU step
    # leaves nothing to overlap). True where unsupported (tp > 1) is an error. Steps that
    # verify speculative drafts run synchronously either way (Engine.step).
    async_scheduling: Optional[bool] = None
    speculative_method: str = "none"
    num_speculative_tokens: int = 4
    draft_model: Optional[str] = None
    speculative_max_num_seqs: int = 16          # no drafts when more requests are running
    seed: int = 0

    def __post_init__(self) -> None:
        def check_choice(name: str, allowed: tuple) -> None:
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not one of {', '.join(allowed)}")

        check_choice("attention_backend", ATTENTION_BACKENDS)
        check_choice("ordering", ORDERINGS)
        check_choice("dtype", DTYPES)
        check_choice("quantization", QUANTIZATION_METHODS)
        check_choice("speculative_method", SPECULATIVE_METHODS)
        if self.gemv_weight_prefetch is not None:   # None: auto
            check_choice("gemv_weight_prefetch", GEMV_WEIGHT_PREFETCH)
        if (not isinstance(self.gemv_max_rows, int) or isinstance(self.gemv_max_rows, bool)
                or not 1 <= self.gemv_max_rows <= GEMV_MAX_ROWS):
            raise ValueError(f"gemv_max_rows must be an integer in 1..{GEMV_MAX_ROWS}, got "
                             f"{self.gemv_max_rows!r}")
        n = self.prefill_graph_max_tokens
        if (not isinstance(n, int) or isinstance(n, bool)
                or not (n == 0 or MIN_PREFILL_GRAPH_TOKENS <= n <= MAX_PREFILL_GRAPH_TOKENS)):
            raise ValueError(f"prefill_graph_max_tokens must be 0 (off) or an integer in "
                             f"{MIN_PREFILL_GRAPH_TOKENS}..{MAX_PREFILL_GRAPH_TOKENS}, got {n!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 1, got {self.block_size}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "planner_window",
                     "tensor_parallel_size", "num_speculative_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
            # Far larger values reached islice() (planner_window >= 2**63: exit 1 after
            # output.mode: overwrite had deleted the old output) or torch's int64 sizes.
            if getattr(self, name) > MAX_COUNT:
                raise ValueError(f"{name} must be <= {MAX_COUNT}, got {getattr(self, name)}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        # Like vLLM: no "0 means default" (null is the default) and never a silent clamp.
        if self.max_model_len is not None and (isinstance(self.max_model_len, bool)
                                               or not isinstance(self.max_model_len, int)
                                               or self.max_model_len < 2):
            # 1 would leave no room for an output token after the shortest prompt: every
            # request an error.
            raise ValueError(f"max_model_len must be an integer >= 2 (a prompt token and an "
                             f"output token) or null (the model's max_position_embeddings), "
                             f"got {self.max_model_len!r}")
        if self.kv_cache_blocks is not None and self.kv_cache_blocks < 1:
            raise ValueError(f"kv_cache_blocks must be >= 1 or null, got {self.kv_cache_blocks}")
        if self.quantize_embeddings and self.quantization != "nf4":
            raise ValueError(f"quantize_embeddings supports nf4 only, got "
                             f"quantization={self.quantization!r}")
        if self.async_scheduling not in (None, True, False):
            raise ValueError(f"async_scheduling must be true, false or null (auto), got "
                             f"{self.async_scheduling!r}")
        # The auto options: None means auto and only False turns them off, so a 0 or "false"
        # (falsy, yet not False) would turn the path on; refused like any other bad value.
        for name in ("skinny_gemv", "pdl", "rotary_in_attention"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"{name} must be true, false or null (auto), got {value!r}")
        if self.async_scheduling and self.tensor_parallel_size > 1:
            raise ValueError("async_scheduling supports tensor_parallel_size 1 only")
        if self.speculative_method == "draft" and not self.draft_model:
            raise ValueError("speculative method 'draft' needs draft_model")

    def resolve_max_model_len(self, model_max: int) -> int:
        """The context length to run with: max_model_len, or the model's own when null. A
        longer one is the model's own (ModelRunner warns): positions past it were never trained
        and rotary tables are sized by it, but refusing it (as vLLM does) made output folders
        written with such a value impossible to resume (it is part of the job's config hash)."""
        if self.max_model_len is None:
            return model_max
        return min(self.max_model_len, model_max)

    def check_device(self, device_type: str) -> None:
        """Settings the resolved device cannot run, refused before the model loads (the
        triton attention backend failed only at the first forward, after the output folder
        existed). TRITON_INTERPRET=1 runs Triton kernels on the CPU (tests)."""
        if (self.attention_backend == "triton" and device_type != "cuda"
                and os.environ.get("TRITON_INTERPRET") != "1"):
            raise EngineConfigError(f"attention_backend='triton' needs a CUDA device, the engine "
                                    f"runs on {device_type}; use auto or torch")

    def async_scheduling_on(self, device_type: str, runner_can_launch: bool) -> bool:
        """Whether the engine schedules asynchronously: the explicit setting, or (None, auto)
        on exactly where it is supported and pays: a CUDA runner with launch(), tp 1. With
        speculation, the steps that draft (small batches) still run synchronously."""
        if self.async_scheduling is not None:
            return self.async_scheduling
        return device_type == "cuda" and runner_can_launch and self.tensor_parallel_size == 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
