"""One rule for a name that may be a local path or a Hugging Face Hub id (model.path,
model.tokenizer, the draft model, input.dataset), so every key is judged alike.

A name that does not exist locally is taken for a Hub id only if it reads as one: "name" or
"org/name" of word characters, '.' and '-', where "org" is not a local folder (then
"org/name" is a local path with a typo in its last part). Anything else (./x, /x, ~/x,
a/b/c, a//b, a name with spaces) is a mistyped local path, said at once, instead of waiting on
Hub retries for a typo. No torch, no hub libraries: the checks run before anything loads.
"""

from __future__ import annotations

import os
import re

# Hub repo ids: an optional owner and a name, each of word characters, '.' and '-'.
_HUB_ID = re.compile(r"^\w[\w.-]*(/\w[\w.-]*)?$")


def looks_like_hub_id(name: str) -> bool:
    """True when `name` reads as a Hub repo id rather than a local path (see module doc)."""
    if not _HUB_ID.match(name):
        return False
    return "/" not in name or not os.path.isdir(name.split("/")[0])


def is_missing_local_path(name: str) -> bool:
    """True when `name` exists neither locally (after ~ expansion) nor reads as a Hub id."""
    return not os.path.exists(os.path.expanduser(name)) and not looks_like_hub_id(name)
