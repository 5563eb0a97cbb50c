"""What differs between the settings an output folder was written with and a job's (no torch).

Each manifest entry records the settings its job's config hash was computed from
(JobSpec.hashed_settings: nested job-file sections, JSON values). A refused resume or merge
names the keys that differ with both values instead of two opaque hashes, so the user can tell
a typo'd rows_per_part from an upgrade, and need not reach for output.mode: overwrite (which
deletes the committed rows) to find out.
"""

from __future__ import annotations

import json
from typing import Any

# The hashed settings' key for jobs/config_hash.py's OUTPUT_RULES_VERSION (what a job file writes).
RULES_KEY = "output_rules"
_UNSET = object()           # a key one side does not record (added by a later version)
# Settings that jobs/config_hash.py leaves out of the hashed settings at their neutral value
# (keys added after folders were written: their hashes must hold). A side that does not record
# one had that value, and a difference says so ("1.0 -> 1.2"), not "(unset) -> 1.2".
LEFT_OUT_AT = {"sampling.repetition_penalty": 1.0, "sampling.presence_penalty": 0.0,
               "sampling.frequency_penalty": 0.0, "sampling.min_p": 0.0,
               "sampling.min_tokens": 0, "sampling.n": 1,
               "sampling.truncate_prompt_tokens": None,
               "sampling.include_stop_str_in_output": False,
               "sampling.skip_special_tokens": True, "sampling.allowed_token_ids": None,
               "sampling.logit_bias": None, "sampling.prompt_logprobs": None,
               "sampling.structured_outputs": None, "sampling.bad_words": None,
               "model.lora": None, "model.continue_final_message": False}
# Mapping-valued keys compared and shown whole ("sampling.logit_bias null -> {5: 2.0}"), not
# split into sub-keys as sections are.
WHOLE_VALUES = {"sampling.logit_bias", "sampling.structured_outputs"}
_MAX_VALUE = 40             # characters of one value in a message (a template's sha256 is 71)
_MAX_KEYS = 6               # differing keys named in one message
_CONTEXT = 16               # characters shown before where two long values first differ


def _flatten(settings: dict, prefix: str = "") -> dict[str, Any]:
    """{"sampling": {"seed": 0}} -> {"sampling.seed": 0}; lists and empty mappings are values
    (an empty one flattened away made {a: {}} and {} compare equal)."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value and f"{prefix}{key}" not in WHOLE_VALUES:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _json(value: Any) -> Any:
    """A value as the config hash sees it: 1, 1.0 and true are equal in Python, not there."""
    return value if value is _UNSET else json.dumps(value, sort_keys=True)


def _text(value: Any) -> str:
    """A value as a job file would spell it: plain words bare, other strings quoted, null,
    true/false and lists as JSON."""
    if value is _UNSET:
        return "(unset)"
    if isinstance(value, str) and value and not any(c.isspace() or c in "\"'," for c in value):
        return value
    return json.dumps(value, ensure_ascii=False)


def _cut(text: str) -> str:
    return text if len(text) <= _MAX_VALUE else text[: _MAX_VALUE - 3] + "..."


def _show_pair(old: Any, new: Any) -> tuple[str, str]:
    """Both values, long ones cut. Two long values that differ only after the cut (two files
    in one long folder) would read the same: both are then shown from a little before the
    first character where they differ."""
    a, b = _text(old), _text(new)
    if a != b and _cut(a) == _cut(b):
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        start = max(0, same - _CONTEXT)
        a, b = "..." + a[start:], "..." + b[start:]
    return _cut(a), _cut(b)


def describe_differences(old: dict, new: dict, arrow: str = "->",
                         skip: tuple[str, ...] = ()) -> str:
    """'output.rows_per_part 50 -> 20, sampling.max_new_tokens 64 -> 32' for the keys (other
    than `skip`) whose values differ, in the job file's order; '' when none does."""
    a, b = _flatten(old), _flatten(new)

    def value(flat: dict[str, Any], key: str) -> Any:
        return flat.get(key, LEFT_OUT_AT.get(key, _UNSET))

    keys = [k for k in list(b) + [k for k in a if k not in b]
            if k not in skip and _json(value(a, k)) != _json(value(b, k))]
    pairs = [(k, *_show_pair(value(a, k), value(b, k))) for k in keys[:_MAX_KEYS]]
    shown = [f"{k} {was} {arrow} {now}" for k, was, now in pairs]
    more = len(keys) - _MAX_KEYS
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def why_written_differently(entry: dict, settings: dict, config_hash: str) -> tuple[str, str]:
    """(why, what to do) for a manifest `entry` whose config hash is not `config_hash`, the
    hash of a job's `settings`: the rest of 'output.path P ...' saying it was written by
    another llmbatch version or with other settings (named), and the first way out."""
    recorded, theirs = entry.get("settings"), entry.get("config_hash")
    older = "rerun it with the llmbatch version that wrote it"
    if not isinstance(recorded, dict) or RULES_KEY not in recorded:
        return (f"was written by an earlier llmbatch version that does not record its settings "
                f"(config hash {theirs}, this job's is {config_hash})", older)
    if recorded[RULES_KEY] != settings[RULES_KEY]:
        later = isinstance(recorded[RULES_KEY], int) and recorded[RULES_KEY] > settings[RULES_KEY]
        return (f"was written by {'a later' if later else 'an earlier'} llmbatch version (output "
                f"rules v{recorded[RULES_KEY]}; this version writes v{settings[RULES_KEY]})",
                older)
    differences = describe_differences(recorded, settings)
    if not differences:      # the entry was edited by hand: only the hashes tell
        return (f"was written by a job with config hash {theirs}, this job's is {config_hash}",
                "rerun with the settings that wrote it")
    return (f"was written with different settings: {differences}",
            "rerun with the original settings")
