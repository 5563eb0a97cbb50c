"""Incremental detokenization of output tokens and stop-string detection (no torch).

IncrementalDetokenizer turns a growing list of output token ids into text deltas in
O(new tokens) per step: each step decodes only a short window, ids[prefix_offset:], and
emits what it adds beyond the decoding of ids[prefix_offset:read_offset] (the previous
emitted chunk). Keeping that previous chunk as context matters for tokenizers whose decoder
treats the first token of a sequence specially (SentencePiece strips its leading space).

Multi-byte characters: byte-level BPE can split one UTF-8 character across tokens; decoding
such a prefix ends in U+FFFD (the replacement character). Text ending in U+FFFD is held back
until a later token completes the character. Because windows only ever start at positions
where the emitted text ended cleanly, they start on a character boundary, and the emitted
deltas concatenate to exactly tokenizer.decode(all output ids) (without the transformers
`clean_up_tokenization_spaces` post-processing, which is not incremental; modern
tokenizers have it off). `flush()` emits what is still held back at the end (e.g. a
character cut by max_new_tokens), replacement characters included, like decode() would.

StopStringChecker finds the first stop string in the text, looking only at the new tail
plus max(len(stop)) - 1 characters before it, and says where to truncate: right before the
stop string (vLLM's default), or right after it with include_in_output (vLLM's
include_stop_str_in_output); text after it, even within the same token, is cut either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Text of one request's output tokens, built incrementally.

    tokenizer: a `tokenizers.Tokenizer` or a transformers tokenizer (anything with
    `decode(ids, skip_special_tokens=...)`). Only output ids are decoded (not the prompt).
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        if not hasattr(tokenizer, "decode"):
            raise TypeError(f"tokenizer must have a decode() method, got {type(tokenizer)!r}")
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # transformers tokenizers take clean_up_tokenization_spaces; tokenizers.Tokenizer
        # does not (and never cleans up).
        self._hf = not _is_raw_tokenizer(tokenizer)
        self.token_ids: list[int] = []
        self.output_text = ""
        # Invariant: ids[:read_offset] are fully reflected in output_text and end on a
        # character boundary; ids[prefix_offset:read_offset] is the context window.
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: Sequence[int]) -> str:
        if self._hf:
            return self.tokenizer.decode(list(ids), skip_special_tokens=self.skip_special_tokens,
                                         clean_up_tokenization_spaces=False)
        return self.tokenizer.decode(list(ids), skip_special_tokens=self.skip_special_tokens)

    def append(self, token_ids: Iterable[int]) -> str:
        """Add new output token ids; return the text they complete ("" if none yet)."""
        new_ids = [int(t) for t in token_ids]
        for t in new_ids:
            if t < 0:
                raise ValueError(f"token ids must be >= 0, got {t}")
        self.token_ids.extend(new_ids)
        if not new_ids:
            return ""
        prefix_text = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.token_ids[self.prefix_offset:])
        # Emit only when the window adds text and does not end mid-character. (Special
        # tokens skipped in decoding add nothing; the window then simply grows.)
        if len(full_text) <= len(prefix_text) or full_text.endswith(_REPLACEMENT_CHAR):
            return ""
        delta = full_text[len(prefix_text):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        self.output_text += delta
        return delta

    def flush(self) -> str:
        """Emit any held-back text (an incomplete character decodes to U+FFFD). Call once
        when the request finishes; afterwards output_text == decode(all token ids)."""
        if self.read_offset == len(self.token_ids):
            return ""
        prefix_text = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.token_ids[self.prefix_offset:])
        delta = full_text[len(prefix_text):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        self.output_text += delta
        return delta


def _is_raw_tokenizer(tokenizer: Any) -> bool:
    try:
        import tokenizers
    except ImportError:                  # pragma: no cover - tokenizers ships with transformers
        return False
    return isinstance(tokenizer, tokenizers.Tokenizer)


@dataclass(frozen=True)
class StopMatch:
    """A stop string found in the text: the output text is text[:truncate_at]."""

    stop: str
    truncate_at: int


class StopStringChecker:
    """Finds stop strings in a growing text, looking only at the newly added tail.
    include_in_output: the kept text ends right after the stop string, not right before it."""

    def __init__(self, stop: Sequence[str], include_in_output: bool = False) -> None:
        for s in stop:
            if not isinstance(s, str) or s == "":
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        self.stop = list(stop)
        self.include_in_output = include_in_output

    def check(self, text: str, num_new_chars: int) -> Optional[StopMatch]:
        """The earliest stop string in `text`, given that text[:-num_new_chars] was already
        checked and holds none. Ties at one position go to the longer stop string.

        Only a match ending inside the new tail counts, so the search for stop string s starts
        len(s) - 1 characters before it (vLLM's per-string lookback): O(num_new_chars + max
        stop length). Per string, not max(len(stop)) - 1 for all: text checked with matching
        off (min_tokens, StopChecker.append(check=False)) may hold a short stop string that a
        longer lookback would find again once matching is on.
        """
        if num_new_chars < 0 or num_new_chars > len(text):
            raise ValueError(f"num_new_chars must be in [0, {len(text)}], got {num_new_chars}")
        if not self.stop or num_new_chars == 0:
            return None
        tail = len(text) - num_new_chars
        best: Optional[StopMatch] = None
        for s in self.stop:
            pos = text.find(s, max(0, tail - (len(s) - 1)))
            if pos < 0:
                continue
            if (best is None or pos < best.truncate_at
                    or (pos == best.truncate_at and len(s) > len(best.stop))):
                best = StopMatch(stop=s, truncate_at=pos)
        if best is not None and self.include_in_output:
            best = StopMatch(stop=best.stop, truncate_at=best.truncate_at + len(best.stop))
        return best
