"""Per-request sampling parameters (no torch)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Optional

from llmbatch.runtime.structured_outputs import check_spec


# A temperature below this samples greedily, as vLLM's (_SAMPLING_EPS): the sampler divides
# float32 logits by it, which overflowed to inf below ~1e-37 and sampled garbage ids (pad, bos).
GREEDY_BELOW_TEMPERATURE = 1e-5
# The largest temperature the sampler's float32 can hold: above it T became inf, and masked
# (-inf) logits became NaN, which argmax picked (a disallowed token, EOS before min_tokens).
FLOAT32_MAX = 3.4028234663852886e38
# The smallest normal float32. A repetition penalty below it became 0 (or a subnormal) in the
# sampler's float32: -inf (masked) logits times 0 became NaN, which argmax picked.
FLOAT32_TINY = 1.1754943508222875e-38


def _is_int(value) -> bool:
    """An int, numpy's too (per-row values), never a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    """How one request samples and when it stops.

    temperature == 0 (or below GREEDY_BELOW_TEMPERATURE) means greedy. top_k <= 0 (or -1)
    disables top-k; top_p == 1.0 disables top-p; min_p == 0 disables min-p (keep tokens whose
    probability is >= min_p times the most likely token's, after temperature; vLLM's min_p).
    `seed` makes sampling reproducible per request, independent of batch composition.
    `logprobs`: None for no logprobs, else the number of top logprobs to return per token (0
    returns only the sampled token's logprob).

    Penalties (runtime/penalties.py; they change greedy decoding too), as vLLM and transformers
    define them: repetition_penalty (1.0 off, > 0) divides the positive logits and multiplies
    the negative ones of every token in the prompt or the output so far (transformers'
    RepetitionPenaltyLogitsProcessor); presence_penalty and frequency_penalty (0.0 off, in
    [-2, 2], OpenAI's) subtract penalty * (token occurred) and penalty * (its count) over the
    output tokens so far.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: Optional[int] = None
    # vLLM's prompt_logprobs: per prompt token after the first, its logprob under the model
    # given the tokens before it, and the top-n (runtime/prompt_logprobs.py). Such a request
    # computes its whole prompt (no prefix-cache hit) until every prompt token is scored.
    prompt_logprobs: Optional[int] = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_p: float = 0.0
    # vLLM's min_tokens: no EOS, stop token id or stop string ends the output before this many
    # tokens (their logits are -inf until then; max_new_tokens and the context still do).
    min_tokens: int = 0
    # Output text only (stop_rules.output_text; the ids are the same either way), vLLM's:
    # include_stop_str_in_output keeps a matched stop string (the text is cut right after it,
    # not right before) and a stop token's text (EOS, stop_token_ids; left out by default);
    # skip_special_tokens=False keeps special tokens' text (decode's argument).
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # vLLM's token rules (runtime/token_rules.py; they change greedy decoding too):
    # allowed_token_ids: only these ids can be emitted (None: all); logit_bias: id -> a number
    # added to that id's logit before sampling.
    allowed_token_ids: Optional[list[int]] = None
    logit_bias: Optional[dict[int, float]] = None
    # vLLM's structured outputs (runtime/structured_outputs.py): one of {"json": schema},
    # {"json_object": True}, {"regex": ...}, {"choice": [...]}, {"grammar": EBNF}.
    structured_outputs: Optional[dict] = None
    # vLLM's bad_words: texts the output may never contain as tokens (token_rules.py).
    bad_words: Optional[list[str]] = None
    # Set by __post_init__. has_penalties: any penalty on; has_token_rules: allowed_token_ids
    # or logit_bias; edits_logits: any of those, needs_history or min_tokens (the sampler
    # changes this row's logits before choosing). Plain attributes, not properties: the
    # sampler scans one for every row of every step (attrgetter in C: 7 us for 256 rows on the
    # CPU here, 29 us as a property).
    has_penalties: bool = field(init=False, repr=False, compare=False)
    # needs_history: the sampler reads the request's tokens so far on the host (penalties, bad
    # words or a grammar): the engine runs synchronous steps while it runs, and drafts nothing
    # for it.
    needs_history: bool = field(init=False, repr=False, compare=False)
    has_token_rules: bool = field(init=False, repr=False, compare=False)
    edits_logits: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._check_types()
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.temperature <= FLOAT32_MAX:  # NaN fails too
            raise ValueError(f"temperature must be >= 0 and fit a float32 (<= 3.4e38), got "
                             f"{self.temperature}")
        if not 0.0 < self.top_p <= 1.0:   # NaN fails too
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 or null, got {getattr(self, name)}")
        if not FLOAT32_TINY <= self.repetition_penalty <= FLOAT32_MAX:   # NaN fails too
            raise ValueError(f"repetition_penalty must be > 0 (1.0 is off) and a normal "
                             f"float32 (1.2e-38 to 3.4e38), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2] (0.0 is off), got "
                                 f"{getattr(self, name)}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1] (0.0 is off), got {self.min_p}")
        if not 0 <= self.min_tokens <= self.max_new_tokens:
            raise ValueError(f"min_tokens must be in [0, max_new_tokens={self.max_new_tokens}], "
                             f"got {self.min_tokens}")
        for name in ("include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        self._check_token_rules()
        self.has_penalties = (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                              or self.frequency_penalty != 0.0)
        self.has_token_rules = bool(self.allowed_token_ids) or bool(self.logit_bias)
        if self.structured_outputs is not None:
            check_spec(self.structured_outputs)
        if self.bad_words is not None and (not isinstance(self.bad_words, list) or not all(
                isinstance(w, str) and w.strip() for w in self.bad_words)):
            raise ValueError(f"bad_words must be a list of non-blank texts, got "
                             f"{self.bad_words!r}")
        self.needs_history = (self.has_penalties or self.structured_outputs is not None
                              or bool(self.bad_words))
        self.edits_logits = (self.needs_history or self.has_token_rules
                             or self.min_tokens > 0)

    def _check_types(self) -> None:
        """Values of the wrong type, refused here: each passed the range checks and then raised
        TypeError inside an engine step, ending every request in flight (seed=1.5, logprobs=True,
        stop_token_ids=5), or ran silently otherwise (top_k=2.5 as 2, max_new_tokens=3.5 as 4).
        As vLLM's SamplingParams: a single stop string is a list of one (iterating the string
        took each character for a stop string), and stop=None is no stop strings."""
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str)
                                                               for s in self.stop):
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")
        self.stop = list(self.stop)
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
                _is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be a list of token ids >= 0, got "
                             f"{self.stop_token_ids!r}")
        self.stop_token_ids = list(self.stop_token_ids)
        for name in ("max_new_tokens", "min_tokens", "top_k"):
            if not _is_int(getattr(self, name)):
                raise ValueError(f"{name} must be an integer, got {getattr(self, name)!r}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be >= -1 (-1 or 0: off), got {self.top_k}")
        for name in ("seed", "logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None and not _is_int(getattr(self, name)):
                raise ValueError(f"{name} must be an integer or null, got "
                                 f"{getattr(self, name)!r}")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{name} must be a number, got {value!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")

    def _check_token_rules(self) -> None:
        """allowed_token_ids: None or a non-empty list of ids >= 0 (an empty one would allow
        nothing: vLLM refuses it too); logit_bias: None or {id >= 0: finite number}. Ids past
        the vocabulary are the engine's request check (request_checks.py)."""
        def is_id(t) -> bool:
            return isinstance(t, int) and not isinstance(t, bool) and t >= 0

        allowed = self.allowed_token_ids
        if allowed is not None and (not isinstance(allowed, list) or not allowed
                                    or not all(map(is_id, allowed))):
            raise ValueError(f"allowed_token_ids must be a non-empty list of token ids >= 0 "
                             f"or null, got {allowed!r}")
        bias = self.logit_bias
        def is_bias(b) -> bool:
            return isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b)

        if bias is not None and (not isinstance(bias, dict) or not all(map(is_id, bias))
                                 or not all(map(is_bias, bias.values()))):
            raise ValueError(f"logit_bias must map token ids >= 0 to finite numbers, or be "
                             f"null, got {bias!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE
