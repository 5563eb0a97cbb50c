"""Stop strings: detect them in the generated text as tokens arrive.

Only requests with stop strings pay for detokenization during generation (incrementally, a
short window per token); the others are decoded once when they finish. The text kept is the
output up to (excluding) the stop string, as vLLM and the OpenAI API return it.
"""

from __future__ import annotations

from typing import Optional

from llmbatch.runtime.detokenizer import IncrementalDetokenizer, StopStringChecker


class StopChecker:
    def __init__(self, tokenizer, stop: list[str]) -> None:
        stop = [s for s in stop if s]
        self.active = bool(stop)
        self.matched: Optional[str] = None
        self.text_before_stop: Optional[str] = None
        if self.active:
            self._detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
            self._checker = StopStringChecker(stop)

    def append(self, token_id: int, check: bool = True) -> bool:
        """Add one output token; True when a stop string now appears in the text. check=False
        (before min_tokens): follow the text, look for no stop string."""
        delta = self._detok.append([token_id])
        if not delta or not check:
            return False
        text = self._detok.output_text
        match = self._checker.check(text, len(delta))
        if match is None:
            return False
        self.matched = match.stop
        self.text_before_stop = text[: match.truncate_at]
        return True
