"""Keys of transformers' generate() and vLLM's SamplingParams that llmbatch does not take under
that name: for an unknown key in `sampling`, the loader gives this hint before difflib's guess,
which for these keys is misleading ('length_penalty': "did you mean 'presence_penalty'?").

Only keys whose meaning is certain are listed; vLLM's max_tokens is not, difflib already
answers 'max_new_tokens'.
"""

from __future__ import annotations

from typing import Optional

_BEAM = "beam search is not supported; llmbatch samples each row independently"
_BEAM_SETTING = "a beam-search setting; beam search is not supported"
_TRUNCATION = "not supported; llmbatch truncates with top_p, top_k and min_p"
_STRUCTURED = "llmbatch calls it 'structured_outputs' (vLLM's newer name)"

_SAMPLING = {
    "num_beams": _BEAM,                       # transformers
    "use_beam_search": _BEAM,                 # vLLM, older SamplingParams
    "length_penalty": _BEAM_SETTING,          # both: scores finished beams only
    "early_stopping": _BEAM_SETTING,          # both: when beam search ends
    "best_of": "vLLM's best_of is not supported; sample with 'n' and pick downstream",
    "num_return_sequences": "llmbatch calls it 'n'",              # transformers
    # temperature alone picks greedy or sampled decoding, as in vLLM.
    "do_sample": "not needed: temperature 0, the default, is greedy; temperature > 0 samples",
    "typical_p": _TRUNCATION,
    "epsilon_cutoff": _TRUNCATION,
    "eta_cutoff": _TRUNCATION,
    "no_repeat_ngram_size": ("not supported; llmbatch penalizes repeats with "
                             "repetition_penalty, presence_penalty and frequency_penalty"),
    "guided_decoding": _STRUCTURED,           # vLLM's SamplingParams before 0.10
    "guided_json": "use structured_outputs: {json: <schema>}",        # vLLM's older keys
    "guided_regex": "use structured_outputs: {regex: <pattern>}",
    "guided_choice": "use structured_outputs: {choice: [<text>, ...]}",
    "guided_grammar": "use structured_outputs: {grammar: <EBNF>}",
    "response_format": ("use structured_outputs: {json: <schema>} or {json_object: true}"),
}


def foreign_key_hint(section: str, key: str) -> Optional[str]:
    """The hint for unknown `key` in `section` (dotted), or None where the loader's usual
    suggestion applies."""
    return _SAMPLING.get(key) if section == "sampling" else None
