"""Stop strings: detect them in the generated text as tokens arrive.

Only requests with stop strings pay for detokenization during generation; the others are
decoded once when they finish. The text kept is the output up to (excluding) the stop string,
as vLLM and the OpenAI API return it.
"""

from __future__ import annotations

from typing import Optional


class StopChecker:
    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.active = bool(self.stop)
        self.token_ids: list[int] = []
        self.text = ""
        self.matched: Optional[str] = None
        self.text_before_stop: Optional[str] = None
        # Longest stop string - 1: how far back a match can start before the new text.
        self._lookback = max((len(s) for s in self.stop), default=1) - 1

    def append(self, token_id: int) -> bool:
        """Add one output token; True when a stop string now appears in the text."""
        self.token_ids.append(token_id)
        previous_len = len(self.text)
        # Full decode keeps multi-byte characters split across byte-level tokens correct.
        # Cost is O(output length) per token, paid only by requests with stop strings.
        self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        search_from = max(0, min(previous_len, len(self.text)) - self._lookback)
        best: Optional[tuple[int, str]] = None
        for s in self.stop:
            at = self.text.find(s, search_from)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, s)
        if best is None:
            return False
        self.matched = best[1]
        self.text_before_stop = self.text[: best[0]]
        return True
