"""StepInputs: the host-side, flattened description of one step, and how it is built from
the scheduler's output (one span of tokens per scheduled request, sampled rows marked)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llmbatch.runtime.scheduler_output import SchedulerOutput


@dataclass
class StepInputs:
    """Host-side description of one step, before it is copied to the device."""

    input_ids: list[int]            # (num_tokens,)
    positions: list[int]            # (num_tokens,)
    slot_mapping: list[int]         # (num_tokens,)
    query_start_loc: list[int]      # (num_seqs + 1,)
    seq_lens: list[int]             # (num_seqs,)
    block_tables: list[list[int]]   # (num_seqs, <= max_blocks), ragged until padded
    sample_rows: list[int]          # rows of the flattened batch whose logits are sampled,
                                    # strictly increasing (ModelRunner.forward_logits relies on it)
    sample_requests: list[Any]      # the Request owning each sampled row
    sample_output_index: list[int]  # index of the output token each sampled row produces
    # Async scheduling: input_ids[deferred_rows[j]] is a placeholder, to be replaced on the
    # device by the previous step's sampled token at its sample row deferred_src[j].
    deferred_rows: list[int] = field(default_factory=list)
    deferred_src: list[int] = field(default_factory=list)
    # prompt_logprobs (runtime/prompt_logprobs.py): rows whose logits score the NEXT prompt
    # token, score_token_ids[j], for request score_requests[j]; increasing, in request order.
    score_rows: list[int] = field(default_factory=list)
    score_requests: list[Any] = field(default_factory=list)
    score_token_ids: list[int] = field(default_factory=list)

    @classmethod
    def empty(cls) -> "StepInputs":
        return cls([], [], [], [0], [], [], [], [], [])

    def add_span(self, tokens: list[int], start: int, block_table: list[int],
                 block_size: int) -> int:
        """Append one query span: `tokens` at positions start.., K/V slots through the
        request's block table. Returns the row index one past the span's last row."""
        end = start + len(tokens)
        bs = block_size
        self.input_ids.extend(tokens)
        self.positions.extend(range(start, end))
        self.slot_mapping.extend(block_table[p // bs] * bs + p % bs for p in range(start, end))
        self.seq_lens.append(end)
        self.block_tables.append(block_table)
        row_end = self.query_start_loc[-1] + len(tokens)
        self.query_start_loc.append(row_end)
        return row_end


def build_step_inputs(out: SchedulerOutput, block_size: int) -> StepInputs:
    """The flattened inputs of one scheduled step (ModelRunner.prepare_inputs)."""
    bs = block_size
    s = StepInputs.empty()
    # Bound methods hoisted: this loop runs for every scheduled request every step.
    ids_append, pos_append, slot_append = (s.input_ids.append, s.positions.append,
                                           s.slot_mapping.append)
    lens_append, tables_append, qsl = s.seq_lens.append, s.block_tables.append, \
        s.query_start_loc
    rows_append, reqs_append, idx_append = (s.sample_rows.append, s.sample_requests.append,
                                            s.sample_output_index.append)
    qsl_append, deferred_rows_append, deferred_src_append = (
        qsl.append, s.deferred_rows.append, s.deferred_src.append)
    for item in out.scheduled:
        req, n = item.request, item.num_new_tokens
        start = req.num_computed_tokens
        pending = req.num_pending_tokens
        if pending or (n == 1 and not req.spec_token_ids and start + 1 == len(req.all_token_ids)):
            # Decode (or the last prompt token): one token that samples. The same rows
            # add_span + the sampling branch below would produce, without the slices.
            row = qsl[-1]
            if pending:
                # Async scheduling: the input is the token that the step in flight samples for
                # this request; its value is still on the device (placeholder 0, filled there).
                if n != 1 or pending != 1 or start != len(req.all_token_ids):
                    raise RuntimeError(f"request {req.request_id!r}: {n} tokens at {start} "
                                       f"with {pending} pending")
                deferred_rows_append(row)
                deferred_src_append(req.pending_sample_index)
                ids_append(0)
            else:
                ids_append(req.all_token_ids[start])
            table = req.block_table
            pos_append(start)
            slot_append(table[start // bs] * bs + start % bs)
            lens_append(start + 1)
            tables_append(table)
            qsl_append(row + 1)
            rows_append(row)
            reqs_append(req)
            idx_append(len(req.output_token_ids) + pending)  # a pending token is output n
            continue
        # The span: known tokens from num_computed_tokens, then any speculative tokens.
        known = req.all_token_ids[start:start + n]
        tokens = known + req.spec_token_ids[: n - len(known)]
        row_end = s.add_span(tokens, start, req.block_table, bs)
        if req.prompt_logprobs_pending:
            _add_score_rows(s, req, start, row_end - len(tokens), len(tokens))
        if item.samples:
            # Verification of k speculative tokens samples at the last k + 1 rows.
            num_samples = 1 + len(req.spec_token_ids)
            for j in range(num_samples):
                s.sample_rows.append(row_end - num_samples + j)
                s.sample_requests.append(req)
                s.sample_output_index.append(req.num_output_tokens + j)
    return s


def _add_score_rows(s: StepInputs, req, start: int, row_start: int, n: int) -> None:
    """Score rows of a prompt span: position p (row row_start + p - start) scores prompt token
    p + 1, for the tokens not scored yet (len(req.prompt_logprobs) of them are: a request
    preempted mid-prompt computes it again without scoring it twice). The prompt's last
    position predicts the first output token: the sampler's row, not a score row."""
    prompt = req.prompt_token_ids
    first = max(start, len(req.prompt_logprobs) - 1)
    last = min(start + n, len(prompt) - 1)          # exclusive
    for p in range(first, last):
        s.score_rows.append(row_start + p - start)
        s.score_requests.append(req)
        s.score_token_ids.append(prompt[p + 1])


def fill_block_tables(tables: list[list[int]], rows: np.ndarray) -> None:
    """Write ragged block tables into the first len(tables) rows of `rows`, a ZEROED
    (>= len(tables), width >= longest table) integer array: each table left-aligned, the rest
    of its row left at 0 (block 0, never read: past the sequence's length).

    One masked assignment from a flat array instead of a numpy slice assignment per row (~1 us
    each, so ~0.25 ms a step at 256 sequences, on the host's critical path)."""
    n = len(tables)
    if n == 0:
        return
    lens = np.fromiter(map(len, tables), dtype=np.int64, count=n)
    flat = np.fromiter(itertools.chain.from_iterable(tables), dtype=rows.dtype,
                       count=int(lens.sum()))
    width = rows.shape[1]
    if flat.size == n * width:   # every table spans the full width: a plain reshape
        rows[:n] = flat.reshape(n, width)
    else:   # row-major mask: the flat values land in table order
        rows[:n][np.arange(width)[None, :] < lens[:, None]] = flat
