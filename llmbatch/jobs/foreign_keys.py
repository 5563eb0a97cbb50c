"""Keys of transformers' generate() and vLLM's SamplingParams that llmbatch does not take under
that name: for an unknown key in `sampling`, the loader gives this hint before difflib's guess,
which for these keys is misleading ('length_penalty': "did you mean 'presence_penalty'?").

Only keys whose meaning is certain are listed; vLLM's max_tokens is not, difflib already
answers 'max_new_tokens'.
"""

from __future__ import annotations

from typing import Collection, NamedTuple, Optional


class _Hint(NamedTuple):
    says: str                    # true whatever the section's keys ("" when nothing is)
    instead: str = ""            # names key `needs`, so it is said only while that key is valid
    needs: Optional[str] = None


_BEAM = _Hint("beam search is not supported; llmbatch samples each row independently")
_BEAM_SETTING = _Hint("a beam-search setting; beam search is not supported")
_TRUNCATION = _Hint("not supported; llmbatch truncates with top_p, top_k and min_p")
_STRUCTURED = _Hint("structured output (guided decoding) is not supported")

# `n` (vLLM's samples per row) is added to `sampling` separately: a hint that names it waits
# for it, so no message ever points at a key the job file would then refuse.
_SAMPLING = {
    "num_beams": _BEAM,                       # transformers
    "use_beam_search": _BEAM,                 # vLLM, older SamplingParams
    "length_penalty": _BEAM_SETTING,          # both: scores finished beams only
    "early_stopping": _BEAM_SETTING,          # both: when beam search ends
    "best_of": _Hint("vLLM's best_of is not supported", "sample with 'n' and pick downstream",
                     "n"),
    "num_return_sequences": _Hint("", "llmbatch calls it 'n'", "n"),
    # temperature alone picks greedy or sampled decoding, as in vLLM.
    "do_sample": _Hint("not needed: temperature 0, the default, is greedy; temperature > 0 "
                       "samples"),
    "typical_p": _TRUNCATION,
    "epsilon_cutoff": _TRUNCATION,
    "eta_cutoff": _TRUNCATION,
    "no_repeat_ngram_size": _Hint("not supported; llmbatch penalizes repeats with "
                                  "repetition_penalty, presence_penalty and frequency_penalty"),
    "guided_decoding": _STRUCTURED,           # vLLM's SamplingParams
    "response_format": _STRUCTURED,           # the OpenAI-style request field
}


def foreign_key_hint(section: str, key: str, valid: Collection[str]) -> Optional[str]:
    """The hint for unknown `key` in `section` (dotted) whose `valid` keys are given, or None
    where the loader's usual suggestion applies."""
    if section != "sampling" or key not in _SAMPLING:
        return None
    hint = _SAMPLING[key]
    parts = [hint.says]
    if hint.instead and (hint.needs is None or hint.needs in valid):
        parts.append(hint.instead)
    return "; ".join(part for part in parts if part) or None
