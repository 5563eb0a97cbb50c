"""Stop strings: detect them in the generated text as tokens arrive.

Only requests with stop strings pay for detokenization during generation (incrementally, a
short window per token); the others are decoded once when they finish. The text kept is the
output up to the stop string, excluding it (vLLM's and the OpenAI API's default) or, with
include_stop_str_in_output, including it; any text after it is cut either way. The text is
decoded with the request's skip_special_tokens, so a stop string can match a special token's
text only when that text is kept (as in vLLM, whose detokenizer decodes with that flag).
"""

from __future__ import annotations

from typing import Optional

from llmbatch.runtime.detokenizer import IncrementalDetokenizer, StopStringChecker
from llmbatch.runtime.sampling_params import SamplingParams


class StopChecker:
    def __init__(self, tokenizer, params: SamplingParams) -> None:
        stop = [s for s in params.stop if s]
        self.active = bool(stop)
        self.matched: Optional[str] = None
        # The output text once a stop string matched, cut before or after it.
        self.text: Optional[str] = None
        if self.active:
            self._detok = IncrementalDetokenizer(
                tokenizer, skip_special_tokens=params.skip_special_tokens)
            self._checker = StopStringChecker(stop, params.include_stop_str_in_output)

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
        self.text = text[: match.truncate_at]
        return True
