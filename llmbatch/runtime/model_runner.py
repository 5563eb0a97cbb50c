"""ModelRunner: owns the native model and the paged KV pool, turns a SchedulerOutput into
flattened model inputs, runs the forward and samples.

One runner per rank. Inputs are built on the host as Python lists and copied to the device
once per step (one tensor per field), so the device never waits on per-request copies.

Where the rest lives: the host-side step description and its building in step_inputs.py;
sizing and allocating the KV pool in kv_pool.py; the CUDA-only fast paths checked at start-up
(Triton argmax self-check, CUDA graph capture) in model_runner_cuda.py, a mixin of
ModelRunner; a launched step's handle and the per-request sampled tokens (LaunchedStep,
collect_sampled) in launched_step.py, re-exported here.
"""

from __future__ import annotations

import logging
import time
from operator import attrgetter
from typing import Any, Optional

import numpy as np
import torch

from llmbatch.runtime.attention import AttentionMetadata, get_attention_backend
from llmbatch.runtime.config import EngineConfig
from llmbatch.runtime.deferred_tokens import DeferredTokens
from llmbatch.runtime.device import host_to_device, make_current, resolve_device, resolve_dtype
from llmbatch.runtime.kernel_paths import enable_kernel_paths
from llmbatch.runtime.kv_pool import allocate_kv_caches, decide_num_kv_blocks, kv_block_bytes
from llmbatch.runtime.launched_step import STEP_KINDS, LaunchedStep, collect_sampled
from llmbatch.runtime.model_runner_cuda import CudaFastPathsMixin
from llmbatch.runtime.sampler import Sampler
from llmbatch.runtime.scheduler_output import SchedulerOutput
from llmbatch.runtime.prompt_logprobs import score_prompt_rows
from llmbatch.runtime.step_inputs import StepInputs, build_step_inputs, fill_block_tables

__all__ = ["LaunchedStep", "ModelRunner", "StepInputs", "collect_sampled"]

logger = logging.getLogger(__name__)
# Per-request fields read for every sampled row every step (map() with these runs in C).
_sampling_params = attrgetter("sampling_params")
_default_seed = attrgetter("default_seed")


def _step_kind(before: tuple[int, int], after: tuple[int, int]) -> str:
    """A step's kind from the (decode, prefill) graph replay counts around its launch."""
    if after[0] > before[0]:
        return "graph"
    return "prefill_graph" if after[1] > before[1] else "eager"


class ModelRunner(CudaFastPathsMixin):
    def __init__(self, config: EngineConfig, hf_config=None, tp_rank: int = 0,
                 tp_size: int = 1, tp_group=None) -> None:
        """tp_rank/tp_size: this process's tensor-parallel slice (tp_executor starts the
        ranks); tp_group: a gloo group over all ranks for host-side agreement (KV blocks)."""
        from llmbatch.runtime.layers.quantization import (attach_quantization, model_weight_bytes,
                                                          stage_in_float32)
        from llmbatch.runtime.layers.bnb_checkpoint import dequantized_tensors, resolve_method
        from llmbatch.runtime.loader import (iterate_checkpoint, load_hf_config, load_weights,
                                             max_positions, resolve_model_path)
        from llmbatch.runtime.lora_merge import merge_stream, read_adapter
        from llmbatch.runtime.models.registry import build_model

        self.config = config
        self.prepare_s = 0.0  # host seconds in prepare_inputs, summed over steps
        # execute() minus prepare_inputs, by step kind: a decode / verify graph replay, a
        # prefill graph replay (prefill_graphs.py) or an eager forward.
        self.step_time_s = dict.fromkeys(STEP_KINDS, 0.0)
        # Of step_time_s, the host time to enqueue the forward and sampling: near step_time_s
        # means the device waited on the host (eager prefills: ~150 Python launches a step).
        self.step_launch_s = dict.fromkeys(STEP_KINDS, 0.0)
        self.step_count = dict.fromkeys(STEP_KINDS, 0)
        # CUDA-event timing of each step on the device (runtime/device_timing.py; opt-in).
        self.device_timer = None
        self.device = resolve_device(config.device)
        config.check_device(self.device.type)
        make_current(self.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.model_path = resolve_model_path(config.model)
        if hf_config is None:
            hf_config = load_hf_config(self.model_path, config.trust_remote_code)
        self.hf_config = hf_config
        model_max = max_positions(hf_config)
        self.max_model_len = config.resolve_max_model_len(model_max)
        if self.max_model_len < (config.max_model_len or 0) and tp_rank == 0:   # once per job
            logger.warning("max_model_len %d is larger than the max_position_embeddings (%d) "
                           "of model %s; using %d", config.max_model_len, model_max,
                           config.model, self.max_model_len)

        self.tp_rank, self.tp_size = tp_rank, tp_size
        # A checkpoint quantized by bitsandbytes brings its own method (and is dequantized
        # while streaming, then requantized per slice: bnb_checkpoint.py).
        self.quantization, prequantized = resolve_method(config.quantization, hf_config)
        # Quantized: the dense shard is staged on the host and each linear layer is quantized
        # straight onto the device, so the device never holds the dense model.
        quantized = self.quantization != "none"
        self.model = build_model(hf_config, self.dtype, "cpu" if quantized else self.device,
                                 tp_rank, tp_size)
        if hasattr(self.model, "check_context_len"):  # e.g. Mistral's sliding window, refused early
            self.model.check_context_len(self.max_model_len)
        attach_quantization(self.model, self.quantization, device=self.device,
                            embeddings=config.quantize_embeddings)
        tensors = None
        if prequantized:
            stage_in_float32(self.model, self.dtype)
            tensors = dequantized_tensors(iterate_checkpoint(self.model_path), self.quantization)
        if config.lora:
            # The adapter's deltas merged into the stream, before slicing and quantization.
            adapter = read_adapter(resolve_model_path(config.lora))
            tensors = merge_stream(tensors if tensors is not None
                                   else iterate_checkpoint(self.model_path), adapter)
        load_weights(self.model, self.model_path, tensors=tensors)
        if quantized:
            self.model.to(self.device)  # the rest: embedding, LM head, norms, rotary
        self.weight_bytes = model_weight_bytes(self.model)  # this rank's loaded weights
        self.weight_bytes_per_rank = [self.weight_bytes]    # tp_executor fills every rank's
        self.model.eval()
        # Which Triton kernel paths apply (runtime/kernel_paths.py; engine stats report them).
        paths = enable_kernel_paths(self.model, self.config, self.device, self.tp_size,
                                    self.quantization)
        self.fused_kernels_active = paths.fused_kernels
        self.int8_triton_layers = paths.int8_triton_layers
        self.int8_triton_error = paths.int8_triton_error
        self.nf4_triton_layers = paths.nf4_triton_layers
        self.nf4_triton_error = paths.nf4_triton_error
        self.skinny_matmul_active = paths.skinny_matmul
        self.skinny_pdl_active = paths.skinny_pdl
        self.skinny_gemv_active = paths.skinny_gemv
        self.skinny_gemv_error = paths.skinny_gemv_error
        self.gemv_max_rows_active = paths.gemv_max_rows   # 1 after a multi-row check failure
        self.gemv_weight_prefetch = paths.gemv_weight_prefetch
        self.l2_prefetch_weights = paths.l2_prefetch_weights
        self.pdl_active = paths.pdl
        if self.device.type == "cuda":   # cos/sin rows gathered per step (layers/rotary.py)
            from llmbatch.runtime.layers.rotary import enable_rope_tables

            enable_rope_tables(self.model, self.max_model_len, self.dtype)
        self.attn_backend = get_attention_backend(config.attention_backend, self.device.type)
        self.rotary_in_attention_active = self._enable_rotary_in_attention()
        self.sampler = Sampler()
        self.triton_argmax_error = self._check_triton_argmax()

        self.block_size = config.block_size
        self.num_kv_blocks = self._decide_num_kv_blocks()
        if tp_size > 1:  # every rank holds the same block ids: the smallest pool wins
            from llmbatch.runtime.dist import min_over_ranks

            self.num_kv_blocks = min_over_ranks(self.num_kv_blocks, tp_group)
        self.kv_caches = self._allocate_kv_caches(self.num_kv_blocks)
        self.cuda_graph_error: Optional[str] = None
        self.graph_logits_error: Optional[str] = None   # the graphs then run without the tail
        self.graph_runner = self._maybe_capture_decode_graphs()
        self.prefill_graph_error: Optional[str] = None
        self.prefill_graph_runner = self._maybe_capture_prefill_graphs()

    # -- KV pool (runtime/kv_pool.py) ---------------------------------------------------
    @property
    def kv_bytes_per_block(self) -> int:
        return kv_block_bytes(self.model, self.block_size, self.dtype)

    def _enable_rotary_in_attention(self) -> bool:
        """EngineConfig.rotary_in_attention (None: auto, on where it applies): decode steps
        rotate, store K/V and attend in one launch (LlamaAttention.attend asks the backend).
        It rides on the fused rotary (set by kernel_paths for fused_kernels on CUDA) and the
        triton backend; elsewhere it is off, with a log line when the config asked for it."""
        asked = getattr(self.config, "rotary_in_attention", None)
        if asked is False:
            return False
        from llmbatch.runtime.models.llama import fused_rotary_on

        if self.attn_backend.name != "triton" or not fused_rotary_on(self.model):
            if asked:
                logger.info("rotary_in_attention ignored: needs the triton attention backend "
                            "and fused_kernels on CUDA (a Llama-family model)")
            return False
        self.attn_backend.rotary_in_attention = True
        logger.info("rotary_in_attention on: decode steps rotate, store K/V and attend in one "
                    "launch")
        return True

    def _decide_num_kv_blocks(self) -> int:
        return decide_num_kv_blocks(self)

    def _allocate_kv_caches(self, num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return allocate_kv_caches(self.model, num_blocks, self.block_size, self.dtype,
                                  self.device)

    # -- one step ---------------------------------------------------------------------
    def prepare_inputs(self, out: SchedulerOutput) -> StepInputs:
        return build_step_inputs(out, self.block_size)

    def _h2d(self, data, dtype: torch.dtype) -> torch.Tensor:
        """Host list or numpy array -> device tensor; on CUDA via pinned memory and a non_blocking copy (the
        caching host allocator keeps the pinned block until the copy has read it)."""
        return host_to_device(data, dtype, self.device)

    def _block_tables_to_device(self, tables: list[list[int]]) -> torch.Tensor:
        """Ragged block tables -> (num_seqs, max_blocks) int32 on the device, right-padded with
        block 0 (never read: past seq_len). Filled through numpy in one masked assignment: a
        list of padded lists cost ~3 us per sequence per step."""
        width = max(max(map(len, tables)), 1)
        padded = np.zeros((len(tables), width), dtype=np.int32)
        fill_block_tables(tables, padded)
        return self._h2d(padded, torch.int32)

    def _to_device(self, s: StepInputs) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        h2d = self._h2d
        qsl = s.query_start_loc
        # Spans are never empty, so one token per sequence (a decode step) means max 1.
        max_query_len = (1 if len(s.input_ids) == len(s.seq_lens) else
                         max(b - a for a, b in zip(qsl, qsl[1:])))
        meta = AttentionMetadata(
            slot_mapping=h2d(s.slot_mapping, torch.long),
            query_start_loc=h2d(s.query_start_loc, torch.int32),
            seq_lens=h2d(s.seq_lens, torch.int32),
            block_tables=self._block_tables_to_device(s.block_tables),
            max_query_len=max_query_len,
            max_seq_len=max(s.seq_lens),
            query_start_loc_cpu=s.query_start_loc,
            seq_lens_cpu=s.seq_lens,
        )
        input_ids = h2d(s.input_ids, torch.long)
        positions = h2d(s.positions, torch.long)
        return input_ids, positions, meta

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> dict[Any, list[int]]:
        """Run one step; return sampled token ids per request id (only requests that sample).

        Logprobs, when a request asked for them, are stored on the request
        (`req.output_logprobs`) so the engine can report them.
        """
        if not out.scheduled:
            return {}
        return self.launch(out).result()

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput,
               prev: Optional[LaunchedStep] = None) -> LaunchedStep:
        """Enqueue one step (inputs, forward, sampling, the copy of its tokens to the host)
        without waiting for the GPU; `.result()` of the returned handle waits. prev: the step
        still in flight, whose sampled tokens this step's deferred inputs read on the device
        (async scheduling; the engine launches at most one step ahead)."""
        t0 = time.perf_counter()
        s = self.prepare_inputs(out)
        t1 = time.perf_counter()
        self.prepare_s += t1 - t0   # host-only input building (engine stats)
        prev_tokens = None
        if s.deferred_rows:
            if prev is None or prev.pending is None:
                raise RuntimeError("a step with deferred input tokens needs the step in flight")
            prev_tokens = prev.pending.token_ids
        replays_before = self._graph_replays()
        timer = self.device_timer
        marks = timer.begin() if timer is not None else None
        logits, greedy_ids = self.forward_step(s, prev_tokens)
        if marks is not None:
            timer.after_forward(marks)
        pending = None
        if logits is not None:
            params = list(map(_sampling_params, s.sample_requests))
            default_seeds = list(map(_default_seed, s.sample_requests))
            pending = self.sampler.sample_async(logits, params, s.sample_output_index,
                                                default_seeds, s.sample_requests,
                                                greedy_ids=greedy_ids)
        if marks is not None:
            timer.after_sampling(marks)
        kind = _step_kind(replays_before, self._graph_replays())
        return LaunchedStep(self, s, pending, kind, time.perf_counter() - t1, marks)

    def _graph_replays(self) -> tuple[int, int]:
        """(decode / verify, prefill) graph replays so far: a step's kind is which one grew."""
        decode, prefill = self.graph_runner, self.prefill_graph_runner
        return (decode.num_replays if decode is not None else 0,
                prefill.num_replays if prefill is not None else 0)

    @torch.inference_mode()
    def forward_logits(self, s: StepInputs,
                       prev_tokens: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """Forward of one step on this rank's shard; (num_samples, vocab) float32 logits, or
        None when nothing samples. Every TP rank calls it with the same `s` (collectives).
        prev_tokens: the previous step's sampled token ids on the device, the source of
        s.deferred_rows (async scheduling)."""
        return self.forward_step(s, prev_tokens)[0]

    @torch.inference_mode()
    def forward_step(self, s: StepInputs, prev_tokens: Optional[torch.Tensor] = None
                     ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """forward_logits, and the greedy argmax of those logits when a CUDA graph computed it
        with them (graph_logits.py; else None: the sampler computes it). Both may be views
        into graph-owned memory, valid until the next decode graph replay."""
        deferred = None
        if s.deferred_rows:
            deferred = DeferredTokens.build(s.deferred_rows, s.deferred_src, prev_tokens,
                                            self._h2d)
        # Pure-decode and verify steps replay a CUDA graph, and so do steps prefilling one
        # sequence where prefill graphs are on (None: no graph for this step, run eagerly).
        hidden = graph_step = None
        if self.graph_runner is not None:
            graph_step = self.graph_runner.replay(s, deferred)
            hidden = graph_step.hidden if graph_step is not None else None
        if hidden is None and self.prefill_graph_runner is not None:
            hidden = self.prefill_graph_runner.run(s, deferred)
        if hidden is None:
            input_ids, positions, meta = self._to_device(s)
            if deferred is not None:
                deferred.write_into(input_ids)
            hidden = self.model(input_ids, positions, self.kv_caches, meta, self.attn_backend)
        if s.score_rows:   # prompt_logprobs: before the sample rows, on every rank alike
            score_prompt_rows(s, hidden, self.model.compute_logits, self._h2d,
                              record=self.tp_rank == 0)
        rows = s.sample_rows
        if not rows:
            return None, None
        if rows[0] == 0 and rows[-1] == len(rows) - 1:
            # Rows increase strictly (step_inputs), so these are 0..n-1: every token samples
            # (decode, verify). A view of the first n rows (graph steps pad past them) spares
            # a host-to-device copy and a gather each step.
            n = len(rows)
            if graph_step is not None and graph_step.logits is not None:
                return graph_step.logits[:n], graph_step.greedy_ids[:n]
            return self.model.compute_logits(hidden[:n]), None
        return (self.model.compute_logits(hidden.index_select(0, self._h2d(rows, torch.long))),
                None)

    @torch.inference_mode()
    def sample(self, s: StepInputs, logits: torch.Tensor) -> dict[Any, list[int]]:
        """Sample the step's logits (rank 0 only); logprobs go on the requests."""
        params = [r.sampling_params for r in s.sample_requests]
        default_seeds = [r.default_seed for r in s.sample_requests]
        result = self.sampler.sample(logits, params, s.sample_output_index, default_seeds,
                                     s.sample_requests)
        return collect_sampled(s, result)
