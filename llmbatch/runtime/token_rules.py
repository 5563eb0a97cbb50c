"""vLLM's allowed_token_ids, logit_bias and bad_words on a step's logits (SamplingParams).

    allowed_token_ids A: every token id outside A gets -inf, so the row can only emit ids in
        A (vLLM's whitelist; a classification job's label tokens);
    logit_bias {id: b}: b is added to the id's logit (OpenAI's and vLLM's logit_bias; -100
        all but bans a token, +100 all but forces it).

Applied to the rows that ask for them first, before the penalties, min_tokens, greedy argmax,
temperature and truncation (vLLM's order: whitelist, then logit_bias, then penalties); the
logprobs stay those of the raw logits (sampler.py), as for the penalties.

Both depend on nothing but the row's params, not on its token history: unlike the penalties
they need no synchronous steps and work on speculative verify rows (every verify position of a
row gets the same rule, so the acceptance test stays lossless).

bad_words (ban_bad_words): vLLM's. Each word is tokenized as written and with one leading space
(the forms it takes at the start of a text and after a space: bad_word_sequences). A one-token
form is banned always; a longer one only when the output so far ends with all its tokens but
the last, which is then banned: the word can never be completed. Output tokens only, not the
prompt (vLLM's). This one reads the history: such rows need the synchronous steps of the
penalties (SamplingParams.needs_history).

Cost: per step, host lists of the ruled rows' ids (prepared once per SamplingParams and kept on
it) and one or two index writes into a (rows, V) copy; nothing for steps without rules.
"""

from __future__ import annotations

from typing import Sequence

import torch

from llmbatch.runtime.device import host_to_device


def apply_token_rules(logits: torch.Tensor, rows: Sequence[int], params: Sequence) -> torch.Tensor:
    """logits (num_rows, V) float32 -> a copy where row rows[i] obeys params[i]'s
    allowed_token_ids and logit_bias (either may be None). Their ids are < V: the engine's
    request check (request_checks.py) refuses a request naming one outside the vocabulary."""
    device = logits.device
    allow_rows, allow_ids, bias_rows, bias_ids, bias_values = [], [], [], [], []
    for i, p in enumerate(params):
        if p.allowed_token_ids:
            allow_rows += [i] * len(p.allowed_token_ids)
            allow_ids += p.allowed_token_ids
        if p.logit_bias:
            bias_rows += [i] * len(p.logit_bias)
            bias_ids += p.logit_bias.keys()
            bias_values += p.logit_bias.values()
    rows_t = host_to_device(list(rows), torch.int64, device)
    sub = logits.index_select(0, rows_t)                                   # (n, V)
    if allow_ids:
        # -inf everywhere on the whitelisted rows, then their allowed ids back; rows without a
        # whitelist keep every id.
        keep = torch.zeros_like(sub, dtype=torch.bool)
        keep[host_to_device(allow_rows, torch.int64, device),
             host_to_device(allow_ids, torch.int64, device)] = True
        listed = host_to_device([bool(p.allowed_token_ids) for p in params], torch.bool,
                                device)[:, None]
        sub = sub.masked_fill(listed & ~keep, float("-inf"))
    if bias_ids:
        sub = sub.index_put((host_to_device(bias_rows, torch.int64, device),
                             host_to_device(bias_ids, torch.int64, device)),
                            host_to_device(bias_values, torch.float32, device), accumulate=True)
    return logits.index_copy(0, rows_t, sub)


def bad_word_sequences(tokenizer, words) -> list[list[int]]:
    """The token sequences of `words` a row must never complete: each word as written (left
    whitespace stripped) and with one leading space, deduplicated, in order."""
    seqs: list[list[int]] = []
    for word in words:
        for prefix in ("", " "):
            ids = list(tokenizer.encode(prefix + word.lstrip(), add_special_tokens=False))
            if ids and ids not in seqs:
                seqs.append(ids)
    return seqs


class BadWordsCache:
    """bad_word_sequences per list of words, for one tokenizer: a job's rows share one list
    (job-wide bad_words), so the words are tokenized once, not at every admission. At most
    `size` lists are kept (per-row lists may all differ); the oldest goes first."""

    def __init__(self, tokenizer, size: int = 256) -> None:
        self.tokenizer, self.size = tokenizer, size
        self._seqs: dict[tuple, list[list[int]]] = {}

    def __call__(self, words) -> list[list[int]]:
        key = tuple(words)
        seqs = self._seqs.get(key)
        if seqs is None:
            if len(self._seqs) >= self.size:
                del self._seqs[next(iter(self._seqs))]
            seqs = self._seqs[key] = bad_word_sequences(self.tokenizer, words)
        return seqs


def full_history(req, output_index: int, row_kind: str, needers: str) -> list[int]:
    """req's output ids, checked to be every token before the one its row samples
    (output_index): rows that read the history (penalties, bad words) sample only in a
    synchronous step without drafts. row_kind / needers name them in the error."""
    out = req.output_token_ids
    if output_index != len(out):
        raise RuntimeError(
            f"request {req.request_id!r}: a {row_kind} row samples output token {output_index} "
            f"but the host has {len(out)}; {needers} need the full history (a synchronous "
            f"step without drafts)")
    return out


def ban_bad_words(logits: torch.Tensor, rows: Sequence[int], requests: Sequence,
                  output_indices: Sequence[int]) -> torch.Tensor:
    """logits (num_rows, V) float32 -> a copy where row rows[i] cannot emit the token that
    would complete one of requests[i].bad_words_ids after its output so far. The output must
    be complete (a synchronous step): the row samples output token output_indices[i]."""
    flat_rows, flat_ids = [], []
    for row, req, idx in zip(rows, requests, output_indices):
        out = full_history(req, idx, "bad_words", "bad words")
        for seq in req.bad_words_ids:
            k = len(seq) - 1
            if k == 0 or (len(out) >= k and out[len(out) - k:] == seq[:-1]):
                flat_rows.append(row)
                flat_ids.append(seq[-1])
    return ban_tokens(logits, flat_rows, flat_ids)


def ban_tokens(logits: torch.Tensor, flat_rows: list[int], flat_ids: list[int]) -> torch.Tensor:
    """A copy of logits (num_rows, V) with -inf at each (flat_rows[j], flat_ids[j]); the
    logits themselves when there is none."""
    if not flat_ids:
        return logits
    device = logits.device
    logits = logits.clone()
    logits[host_to_device(flat_rows, torch.int64, device),
           host_to_device(flat_ids, torch.int64, device)] = float("-inf")
    return logits
