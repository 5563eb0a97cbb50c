"""The one-line message of a job that fails JobSpec's validation (loader.validate): the key,
dotted with its section, and what was expected; an unknown key gets a hint for a
transformers/vLLM key (foreign_keys), the closest valid key (_suggestion) or the valid keys.
"""

from __future__ import annotations

import difflib
from typing import Optional

from pydantic import BaseModel

from llmbatch.jobs.foreign_keys import foreign_key_hint
from llmbatch.jobs.spec import JobSpec

# pydantic error type -> how we name the expected type.
_EXPECTED = {
    "int_parsing": "an integer", "int_type": "an integer", "int_from_float": "an integer",
    "float_parsing": "a number", "float_type": "a number",
    "bool_parsing": "a boolean (true/false)", "bool_type": "a boolean (true/false)",
    "string_type": "a string", "list_type": "a list", "dict_type": "a mapping",
    "model_type": "a mapping", "model_attributes_type": "a mapping",
}


def _section_model(loc: tuple) -> tuple[Optional[type[BaseModel]], list[str]]:
    """Walk JobSpec along `loc`; return the model owning the last key and the clean key path."""
    model: Optional[type[BaseModel]] = JobSpec
    path: list[str] = []
    for i, part in enumerate(loc):
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            if i == len(loc) - 1 and isinstance(part, str) and model is not None:
                path.append(part)        # the unknown key itself
            break
        path.append(part)
        annotation = model.model_fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) \
            else None
    # The owner of the last key is the model one level up from it.
    owner: Optional[type[BaseModel]] = JobSpec
    for part in path[:-1]:
        ann = owner.model_fields[part].annotation if owner else None
        owner = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return owner, path


def _suggestion(key: str, valid: list[str]) -> Optional[str]:
    """The valid key `key` was plausibly meant as: a close spelling (difflib ratio >= 0.6:
    'temprature', 'max_tokens', 'topk'), or the one key it begins (a shortened 'gpu_mem').
    At 0.5, unrelated keys sharing a few letters were offered ('best_of': "did you mean
    'stop'?"); the full list of valid keys helps more then."""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        return close[0]
    begun = [name for name in valid if len(key) >= 3 and name.startswith(key)]
    return begun[0] if len(begun) == 1 else None


def describe_validation_errors(errors: list[dict]) -> str:
    """pydantic's errors of JobSpec.model_validate -> the one line InvalidJobError says: the
    first error's key, dotted with its section, and what it expected."""
    first = errors[0]
    owner, path = _section_model(tuple(first["loc"]))
    dotted = ".".join(path) or "job"
    kind = first["type"]
    if kind == "extra_forbidden":
        key = path[-1]
        valid = sorted(owner.model_fields) if owner else []
        # A generate()/SamplingParams key (foreign_keys) gets its own hint, before difflib's.
        hint = foreign_key_hint(".".join(path[:-1]), key)
        if hint is None:
            close = _suggestion(key, valid)
            hint = f"did you mean '{close}'?" if close else f"valid keys: {', '.join(valid)}"
        section = f"in section '{'.'.join(path[:-1])}'" if len(path) > 1 else "at the top level"
        return f"unknown key '{key}' {section} ({hint})"
    if kind == "invalid_key" or first["loc"][-1:] == ("[key]",):
        # A YAML key that is a number, boolean or null: its mapping (pydantic puts str(key)
        # last for a section, as if 'None' were a key) and the key, not "expected a string".
        owner_path = _section_model(tuple(first["loc"][:-1]))[1] if kind == "invalid_key" \
            else path
        return f"{'.'.join(owner_path) or 'job'}: keys must be strings, got {first.get('input')!r}"
    if kind == "missing":
        if len(path) == 1:
            return f"missing required section '{path[0]}'"
        return f"missing required key '{path[-1]}' in section '{'.'.join(path[:-1])}'"
    # All errors on the same key (a union yields one per member) describe one expectation.
    same = [e for e in errors if _section_model(tuple(e["loc"]))[1] == path]
    expected = []
    for e in same:
        if e["type"] == "literal_error":
            expected.append("one of " + e["ctx"]["expected"].replace(" or ", ", "))
        elif e["type"] in _EXPECTED:
            expected.append(_EXPECTED[e["type"]])
    got = first.get("input")
    if expected:
        unique = list(dict.fromkeys(expected))
        return f"{dotted}: expected {' or '.join(unique)}, got {got!r}"
    msg = first["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    msg = msg.replace("Input should be", "must be")
    # A message that begins with its key ("input.path is empty", "output: ...") says it whole.
    head, section = msg.split(" ", 1)[0].rstrip(":"), dotted.split(".")[0]
    if dotted == "job" or head == section or head.startswith(section + "."):
        return msg
    if f"got {got!r}" in msg:       # the message quotes the value already
        return f"{dotted}: {msg}"
    return f"{dotted}: {msg} (got {got!r})"
