"""The job file's `sampling` section (no torch): how each row samples and stops, and which keys
a row may override from an input column (PER_ROW_KEYS; sampling_values.row_value checks those
cells). spec.py re-exports both names.
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import ConfigDict, Field, field_validator, model_validator

from llmbatch.jobs.sampling_values import (check_allowed_token_ids, check_stop,
                                           check_stop_token_ids, check_top_k)
from llmbatch.jobs.section_base import Float, Int, Section
from llmbatch.runtime.sampling_params import GREEDY_BELOW_TEMPERATURE
from llmbatch.runtime.structured_outputs import check_spec, schema_text


# Keys of `sampling` that a row may override with a column of the same name.
PER_ROW_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                "stop_token_ids", "ignore_eos", "logprobs", "repetition_penalty",
                "presence_penalty", "frequency_penalty", "min_p", "min_tokens",
                "include_stop_str_in_output", "skip_special_tokens", "allowed_token_ids",
                "prompt_logprobs", "structured_outputs", "bad_words")


class SamplingSection(Section):
    # NaN/inf are never valid sampling values (NaN would slip through every >= check).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    max_new_tokens: Int = Field(default=256, ge=1)
    temperature: Float = Field(default=0.0, ge=0.0)
    top_p: Float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: Int = -1                     # -1 or 0: off (as in vLLM; 0 stored as -1); < -1 refused
    # vLLM's penalties and min_p, with SamplingParams' ranges; the defaults are "off". At those
    # values config_hash leaves them out of the hash (folders written before them resume).
    repetition_penalty: Float = Field(default=1.0, gt=0.0)
    presence_penalty: Float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: Float = Field(default=0.0, ge=-2.0, le=2.0)
    min_p: Float = Field(default=0.0, ge=0.0, le=1.0)
    # vLLM's min_tokens: no EOS, stop token id or stop string ends a row's output before this
    # many tokens. At most max_new_tokens (_min_tokens_fits); 0 (off) is left out of the hash.
    min_tokens: Int = Field(default=0, ge=0)
    # int64: the stats Parquet stores it as such; a wider seed used to fail only after the
    # whole shard had run, when the stats row was written.
    seed: Int = Field(default=0, ge=-(2**63), le=2**63 - 1)
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[Int] = Field(default_factory=list)
    ignore_eos: bool = False
    logprobs: Optional[Int] = Field(default=None, ge=0)
    # vLLM's prompt_logprobs: top-n logprobs of every prompt token (a `prompt_logprobs`
    # column). Such rows compute their whole prompt: no prefix-cache hit.
    prompt_logprobs: Optional[Int] = Field(default=None, ge=0)
    # vLLM's output-text options (the ids are the same either way): keep a matched stop
    # string and a stop token's text; keep special tokens' text.
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # vLLM's token rules: only these ids can be emitted (null: all); id -> added to its logit.
    # Ids past the vocabulary are refused once the model is loaded (engine_limits).
    allowed_token_ids: Optional[list[Int]] = None
    logit_bias: Optional[dict[Int, Float]] = None
    # vLLM's structured outputs: one of {json: schema}, {json_object: true}, {regex: ...},
    # {choice: [...]}, {grammar: EBNF} (runtime/structured_outputs.py; needs xgrammar).
    structured_outputs: Optional[dict[str, Any]] = None
    # vLLM's bad_words: texts the output never completes (runtime/token_rules.py); one text is
    # a list of one, as for stop.
    bad_words: Optional[list[str]] = None
    # vLLM's n: samples per row, each an output row of its own (`sample_index` 0..n-1, which
    # the output has only when n > 1). Job-wide, not per row, so every input row has exactly
    # n output rows. 1 is left out of the config hash.
    # Samples per row; bounded so a typo (1e14) is a one-line error, not a MemoryError.
    n: Int = Field(default=1, ge=1, le=100_000)
    # vLLM's truncate_prompt_tokens: keep only the last k prompt tokens (left truncation,
    # after the chat template), -1 the longest prompt that runs (max_model_len - 1); None
    # (off) leaves a too-long prompt an error row. Job-wide; None is left out of the hash.
    truncate_prompt_tokens: Optional[Int] = None
    per_row: list[str] = Field(default_factory=list)

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, value: int) -> int:
        return check_top_k(value)

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _truncation(cls, value: Optional[int]) -> Optional[int]:
        if value is not None and value != -1 and value < 1:
            raise ValueError("must be -1 (the longest prompt that runs) or a number of "
                             "tokens >= 1, or null (off)")
        return value

    @field_validator("bad_words")
    @classmethod
    def _bad_words(cls, value: Optional[list[str]]) -> Optional[list[str]]:
        if value is not None and any(not w.strip() for w in value):
            raise ValueError("a blank bad word bans nothing; remove it")
        return value or None        # [] bans nothing: one spelling, null

    @field_validator("stop", "bad_words", mode="before")
    @classmethod
    def _one_string(cls, value):
        # One string is a list of one, as vLLM's SamplingParams(stop="###") takes it; stored
        # as the list, so both spellings have one config hash.
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: list[str]) -> list[str]:
        return check_stop(value)

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_token_ids(cls, value: list[int]) -> list[int]:
        return check_stop_token_ids(value)

    @field_validator("allowed_token_ids")
    @classmethod
    def _allowed_token_ids(cls, value: Optional[list[int]]) -> Optional[list[int]]:
        return None if value is None else check_allowed_token_ids(value)

    @field_validator("structured_outputs")
    @classmethod
    def _structured_outputs(cls, value: Optional[dict]) -> Optional[dict]:
        if value is not None:
            check_spec(value)
            value = schema_text(value)      # the schema's key order kept, and hashed
        return value

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _logit_bias_keys_once(cls, value):
        # {1: 2, "1": 3} are two YAML keys but one token id: the bias 2 was dropped silently.
        if isinstance(value, dict):
            seen: dict[int, object] = {}
            for key in value:
                try:
                    token = int(key) if not isinstance(key, bool) and float(key) == int(key) \
                        else None
                except (TypeError, ValueError, OverflowError):
                    token = None
                if token is None:
                    continue                       # the field's own check names it
                if token in seen:
                    raise ValueError(f"token id {token} is given twice ({seen[token]!r} and "
                                     f"{key!r})")
                seen[token] = key
        return value

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: Optional[dict[int, float]]) -> Optional[dict[int, float]]:
        if value is not None:
            check_stop_token_ids(list(value))       # ids >= 0, the same message
        return value or None                        # {} biases nothing: one spelling, null

    @model_validator(mode="after")
    def _min_tokens_fits(self) -> "SamplingSection":
        # With a per-row max_new_tokens column the job's is only the null cells' value: a row
        # whose max_new_tokens is below min_tokens is that row's error (SamplingParams').
        if self.min_tokens > self.max_new_tokens and "max_new_tokens" not in self.per_row:
            raise ValueError(f"sampling.min_tokens: must be at most sampling.max_new_tokens, "
                             f"{self.max_new_tokens} (got {self.min_tokens})")
        return self

    @model_validator(mode="after")
    def _structured_alone(self) -> "SamplingSection":
        # Job-wide values every row would share: one job error, not an error row per row
        # (runtime/request_checks.py refuses the same per request).
        if self.structured_outputs is not None and "structured_outputs" not in self.per_row:
            if self.min_tokens > 0 and "min_tokens" not in self.per_row:
                raise ValueError("sampling.min_tokens does not apply with structured_outputs "
                                 "(the grammar decides where the output ends); set it to 0")
            if self.allowed_token_ids and "allowed_token_ids" not in self.per_row:
                raise ValueError("sampling.allowed_token_ids and structured_outputs cannot be "
                                 "combined (the grammar decides which tokens may come)")
        return self

    @model_validator(mode="after")
    def _n_samples_differ(self) -> "SamplingSection":
        # transformers refuses num_return_sequences > 1 with greedy search: n copies of one
        # output are almost surely a mistake. A per-row temperature column may still give a
        # row temperature 0; its samples are then equal (README).
        greedy = self.temperature < GREEDY_BELOW_TEMPERATURE
        if self.n > 1 and greedy and "temperature" not in self.per_row:
            raise ValueError(f"sampling.n: {self.n} samples of a greedy job (temperature 0) "
                             f"are all the same; set sampling.temperature >= 1e-5")
        return self

    @field_validator("per_row")
    @classmethod
    def _known_per_row(cls, value: list[str]) -> list[str]:
        for key in value:
            if key not in PER_ROW_KEYS:
                what = ("is a job-wide sampling key, not a per-row one" if key in
                        cls.model_fields and key != "per_row" else "is not a sampling key")
                raise ValueError(f"'{key}' {what}; per-row keys are "
                                 f"{', '.join(PER_ROW_KEYS)}")
        twice = sorted({k for k in value if value.count(k) > 1})
        if twice:   # like a key given twice in the YAML: refused, not silently merged
            raise ValueError(f"names {', '.join(repr(k) for k in twice)} more than once")
        return value
