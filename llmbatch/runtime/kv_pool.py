"""The paged KV pool: how many blocks fit, and allocating them.

Sizing (`decide_num_kv_blocks`): a fixed `kv_cache_blocks` wins; otherwise the budget is the
CPU's `cpu_kv_cache_bytes`, or on CUDA the memory left within `gpu_memory_utilization` after a
warm-up forward at the full token budget (weights + activation peak measured, everything
other processes hold counted against us). A draft model (draft_proposer.py) is built after the
pool with as many blocks, so its weights and its KV per block come out of the same budget.
The pool never exceeds what max_num_seqs sequences at max_model_len could use, and must hold
one max_model_len sequence (like vLLM), so every admitted request can finish alone.

Layout (attention/backend.py): per layer, K and V each (num_blocks, block_size,
num_kv_heads_per_rank, head_dim) in the model dtype.
"""

from __future__ import annotations

import logging
import os

import torch

from llmbatch.runtime.attention import AttentionMetadata
from llmbatch.runtime.config import EngineConfigError

logger = logging.getLogger(__name__)


def kv_block_bytes(model, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one KV block of `model` (a native model, possibly on the meta device): K and V,
    every layer, block_size tokens, this rank's KV heads. Target and draft pools both use it."""
    elem = torch.tensor([], dtype=dtype).element_size()
    return 2 * model.num_layers * block_size * model.num_kv_heads_per_rank * model.head_dim * elem


def allocate_kv_caches(model, num_blocks: int, block_size: int, dtype: torch.dtype,
                       device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (num_blocks, block_size, model.num_kv_heads_per_rank, model.head_dim)
    return [
        (torch.zeros(shape, dtype=dtype, device=device),
         torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(model.num_layers)
    ]


def _device_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _check_fixed_pool_fits(runner, num_blocks: int) -> None:
    """EngineConfigError (a job's exit 2) for a kv_cache_blocks larger than the device's whole
    memory: torch raised an overflow TypeError (~1e20 blocks) or an allocation error naming
    C++ frames (exit 1, a 1,500-character line), or the host began swapping. A pool that fits
    the memory but not what is free is still the allocator's to refuse."""
    need = num_blocks * runner.kv_bytes_per_block
    total = _device_memory_bytes(runner.device)
    if need > total:
        raise EngineConfigError(
            f"kv_cache_blocks={num_blocks} needs {need / 2**30:.1f} GiB of KV cache, more than "
            f"the {runner.device.type} device's {total / 2**30:.1f} GiB of memory; lower it or "
            f"set it to null (sized from the memory budget)")


def decide_num_kv_blocks(runner) -> int:
    """Blocks for `runner` (a ModelRunner with its model loaded, before its pool exists)."""
    cfg = runner.config
    if cfg.kv_cache_blocks is not None:
        _check_fixed_pool_fits(runner, cfg.kv_cache_blocks)
        return cfg.kv_cache_blocks
    # Never more than every running sequence at full length could use.
    blocks_per_seq = -(-runner.max_model_len // runner.block_size)
    useful = cfg.max_num_seqs * blocks_per_seq + 1
    if runner.device.type == "cuda":
        budget, knob = cuda_kv_budget_bytes(runner), "gpu_memory_utilization"
    else:
        budget, knob = cfg.cpu_kv_cache_bytes, "cpu_kv_cache_bytes"
    target_per_block = runner.kv_bytes_per_block
    draft_weights, draft_per_block = 0, 0
    if cfg.speculative_method == "draft":
        from llmbatch.runtime.draft_proposer import draft_memory_need

        draft_weights, draft_per_block = draft_memory_need(cfg, runner.dtype)
    per_block = target_per_block + draft_per_block
    num_blocks = min(useful, max(budget - draft_weights, 0) // per_block)
    if draft_per_block:
        logger.info("KV budget %.3f GiB: draft weights %.3f GiB, %d blocks x (%d target + "
                    "%d draft bytes)", budget / 2**30, draft_weights / 2**30, num_blocks,
                    target_per_block, draft_per_block)
    if num_blocks < blocks_per_seq:
        draft = (f" (after the draft model's {draft_weights} weight bytes, with its KV pool "
                 f"of {draft_per_block} bytes per block beside the target's "
                 f"{target_per_block})" if draft_per_block else "")
        # A setting the device's memory cannot honour (EngineConfigError): jobs report it as
        # "invalid engine settings", exit 2, not as a model that fails to load.
        raise EngineConfigError(
            f"KV cache too small: {num_blocks} blocks of {runner.block_size} tokens fit the "
            f"memory budget{draft}, one {runner.max_model_len}-token sequence needs "
            f"{blocks_per_seq}; raise {knob} or lower max_model_len")
    return int(num_blocks)


def cuda_kv_budget_bytes(runner) -> int:
    """Free memory after a warm-up forward at the full token budget, within utilization."""
    device = runner.device
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    _warmup_forward(runner)
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    peak = torch.cuda.max_memory_allocated(device)
    current = torch.cuda.memory_allocated(device)
    # Everything not ours (other processes, the CUDA context) counts against the budget.
    used_by_others = total - free - torch.cuda.memory_reserved(device)
    budget = total * runner.config.gpu_memory_utilization - used_by_others - peak
    logger.info("KV budget %.2f GiB (weights+activations peak %.2f GiB, current %.2f GiB)",
                budget / 2**30, peak / 2**30, current / 2**30)
    return max(int(budget), 0)


@torch.inference_mode()
def _warmup_forward(runner) -> None:
    """One prefill at the full token budget with a scratch cache, to measure the peak."""
    device = runner.device
    num_tokens = min(runner.config.max_num_batched_tokens, runner.max_model_len)
    scratch_blocks = -(-num_tokens // runner.block_size)
    caches = allocate_kv_caches(runner.model, scratch_blocks, runner.block_size, runner.dtype,
                                device)
    ids = torch.zeros(num_tokens, dtype=torch.long, device=device)
    pos = torch.arange(num_tokens, device=device)
    meta = AttentionMetadata(
        slot_mapping=pos.clone(),
        query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=device),
        block_tables=torch.arange(scratch_blocks, dtype=torch.int32, device=device).unsqueeze(0),
        max_query_len=num_tokens, max_seq_len=num_tokens,
        query_start_loc_cpu=[0, num_tokens], seq_lens_cpu=[num_tokens])
    hidden = runner.model(ids, pos, caches, meta, runner.attn_backend)
    runner.model.compute_logits(hidden[-1:])
    del caches
