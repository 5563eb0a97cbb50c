"""Draft-model speculative decoding: a small model proposes, the target verifies.

The draft runs on its own KV pool that mirrors the target's block layout: same number of
blocks, and each request's draft K/V for position p lives at the slot the TARGET's block table
gives p. So the draft needs no block manager of its own; it borrows the target's allocations.

Proposals need KV slots for the positions they are computed at (the last known token at n - 1,
then drafts at n .. n + k - 2), and those slots exist only after the scheduler has allocated
1 + k tokens for the request. Hence two phases per step (see Engine.step):
  1. before scheduling, `reserve` puts k placeholder drafts on each decoding request, so the
     scheduler budgets and allocates for 1 + k tokens (it may trim or drop them);
  2. after scheduling, `fill` runs the draft over the scheduled requests and overwrites the
     placeholders with real proposals, before the target's forward.

Which draft K/V is valid: the draft remembers the tokens it fed at which positions; at the next
step the longest run that still matches the request's real tokens stays valid, everything after
it is recomputed (catch-up prefill). Preemption resets it (the blocks were released).
Proposals are the draft's greedy tokens, a deterministic proposal, so acceptance by
spec_decode.num_accepted keeps the output identical to speculation off.

Memory: the target's runner sizes its pool first, leaving room for this draft on the same
budget (draft_memory_need: the draft's weight bytes, plus its KV bytes for each block).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from llmbatch.runtime.config import EngineConfig
from llmbatch.runtime.kernel_paths import inheriting_process_switches
from llmbatch.runtime.kv_pool import kv_block_bytes
from llmbatch.runtime.model_runner import ModelRunner, StepInputs
from llmbatch.runtime.request import Request

PLACEHOLDER = 0


@dataclasses.dataclass
class _DraftState:
    epoch: int                # req.num_preemptions when the draft K/V was written
    num_valid: int            # positions 0 .. num_valid - 1 hold K/V of real tokens
    fed: list[int]            # drafts fed at positions num_valid, num_valid + 1, ... (unverified)


def draft_runner_config(config: EngineConfig, num_kv_blocks: Optional[int] = None,
                        max_model_len: Optional[int] = None) -> EngineConfig:
    """The draft's own runner config: dense, single-rank, eager, its pool size given."""
    return dataclasses.replace(
        config, model=config.draft_model, tokenizer=None, kv_cache_blocks=num_kv_blocks,
        max_model_len=max_model_len, speculative_method="none", draft_model=None, lora=None,
        cuda_graphs=False, prefill_graph_max_tokens=0, tensor_parallel_size=1,
        quantization="none", quantize_embeddings=False)


def draft_memory_need(config: EngineConfig, dtype: torch.dtype) -> tuple[int, int]:
    """(weight bytes, KV bytes per block) the draft model of `config` will take on the target's
    device, known before the target sizes its pool (kv_pool.decide_num_kv_blocks).

    The draft model is built on the meta device (no memory, no weight I/O) exactly as its
    runner will build it: its parameters are the bytes it will load (tied ones once), and its
    layer/KV-head/head_dim attributes give the block size through the target's own formula.
    A draft checkpoint quantized by bitsandbytes loads smaller than this dense estimate."""
    from llmbatch.runtime.layers.quantization import model_weight_bytes
    from llmbatch.runtime.loader import load_hf_config, resolve_model_path
    from llmbatch.runtime.models.registry import build_model

    dcfg = draft_runner_config(config)
    hf_config = load_hf_config(resolve_model_path(dcfg.model), dcfg.trust_remote_code)
    model = build_model(hf_config, dtype, "meta")
    return model_weight_bytes(model), kv_block_bytes(model, dcfg.block_size, dtype)


class DraftModelProposer:
    def __init__(self, config: EngineConfig, num_kv_blocks: int, max_model_len: int,
                 vocab_size: int) -> None:
        from llmbatch.runtime.loader import load_hf_config, max_positions, resolve_model_path

        # Checked before the draft's runner exists: given the target's length, a runner would
        # clamp it to the draft's own and warn "using N" just before this refusal. The config
        # read here is the runner's too (read once).
        dcfg = draft_runner_config(config, num_kv_blocks, max_model_len)
        draft_hf_config = load_hf_config(resolve_model_path(dcfg.model), dcfg.trust_remote_code)
        draft_max = max_positions(draft_hf_config)
        if draft_max < max_model_len:
            raise ValueError(f"draft model {config.draft_model}: its context {draft_max} is "
                             f"shorter than the target's {max_model_len}; set "
                             f"engine.max_model_len lower")
        # The draft never sizes its own pool: the target reserved room for it (same count).
        # Its runner keeps the process-wide PDL / gemv weight-prefetch switches the target's
        # runner set (kernel_paths.inheriting_process_switches says why).
        with inheriting_process_switches():
            self.runner = ModelRunner(dcfg, hf_config=draft_hf_config)
        draft_vocab = self.runner.hf_config.vocab_size
        if draft_vocab != vocab_size:
            raise ValueError(f"draft model vocabulary ({draft_vocab}) differs from the target's "
                             f"({vocab_size}); the draft must share the target's tokenizer")
        self.block_size = config.block_size

    # -- phase 1 ------------------------------------------------------------------------------
    def reserve(self, req: Request, num_tokens: int) -> list[int]:
        """Placeholders so the scheduler allocates slots for `num_tokens` drafts."""
        return [PLACEHOLDER] * num_tokens

    # -- phase 2 ------------------------------------------------------------------------------
    def fill(self, reqs: list[Request]) -> None:
        """Overwrite each request's placeholder drafts with the draft model's greedy tokens."""
        reqs = [r for r in reqs if r.spec_token_ids]
        if not reqs:
            return
        # Round 0: catch-up prefill through the last known token, which yields draft 1.
        spans = [self._catch_up_span(r) for r in reqs]
        firsts = self._run(reqs, spans)
        for r, d in zip(reqs, firsts):
            self._record_catch_up(r)
            r.spec_token_ids[0] = d
        # Rounds 1 .. k-1: feed draft j at position n - 1 + j, get draft j + 1.
        for j in range(1, max(len(r.spec_token_ids) for r in reqs)):
            active = [r for r in reqs if len(r.spec_token_ids) > j]
            spans = [(r.num_tokens - 1 + j, [r.spec_token_ids[j - 1]]) for r in active]
            nexts = self._run(active, spans)
            for r, (_, tokens), d in zip(active, spans, nexts):
                self._record_draft(r, tokens[0])
                r.spec_token_ids[j] = d

    # -- helpers ------------------------------------------------------------------------------
    def _valid_prefix(self, req: Request) -> int:
        """How many leading positions hold draft K/V computed from the request's real tokens:
        the confirmed ones, plus the fed drafts that the target has since accepted."""
        # Kept on the request itself, so it dies with it.
        state = req.draft_state
        if state is None or state.epoch != req.num_preemptions:
            return 0
        real = req.all_token_ids
        valid = state.num_valid
        for token in state.fed:
            if valid >= len(real) or real[valid] != token:
                break
            valid += 1
        return valid

    def _catch_up_span(self, req: Request) -> tuple[int, list[int]]:
        # Always recompute at least the last known token: its logits give draft 1.
        start = min(self._valid_prefix(req), req.num_tokens - 1)
        return start, req.all_token_ids[start:]

    def _record_catch_up(self, req: Request) -> None:
        """After round 0 every known token has draft K/V; nothing unverified is fed yet."""
        req.draft_state = _DraftState(req.num_preemptions, req.num_tokens, [])

    def _record_draft(self, req: Request, token: int) -> None:
        req.draft_state.fed.append(token)

    @torch.inference_mode()
    def _run(self, reqs: list[Request], spans: list[tuple[int, list[int]]]) -> list[int]:
        """One draft forward over the spans; the greedy token after each span's last row."""
        s = StepInputs.empty()
        for req, (start, tokens) in zip(reqs, spans):
            row_end = s.add_span(tokens, start, req.block_table, self.block_size)
            s.sample_rows.append(row_end - 1)
            s.sample_requests.append(req)
            s.sample_output_index.append(0)
        logits = self.runner.forward_logits(s)
        return logits.argmax(dim=-1).tolist()
