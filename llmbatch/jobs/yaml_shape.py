"""Limits on what a job file's YAML may build, checked before anything walks it (no torch).

YAML aliases let a few hundred bytes name one mapping from many places ("billion laughs"):
PyYAML shares the object, but the loader's passes (fspath_values, expand_env) and pydantic
copy every reference, so a 600-byte file took 27 s and 1.1 GB, one level more all memory.
An alias may also name the node it sits in (`a: &x [*x]`): the walks never ended
(RecursionError, exit 1). And PyYAML's composer recurses per nesting level: 5,000 '[' raised
RecursionError too.
"""

from __future__ import annotations

from llmbatch.jobs.errors import InvalidJobError

# Values (each mapping, list and scalar counted once per place it is reached). A job's largest
# legitimate value is a vocabulary-sized list (allowed_token_ids, logit_bias): ~256k entries.
MAX_VALUES = 2_000_000


def check_yaml_shape(data, where: str) -> None:
    """InvalidJobError naming `where` (e.g. "job file x.yaml") when `data`, as YAML built it,
    would expand past MAX_VALUES values or contains itself."""
    sizes: dict[int, int] = {}       # id(container) -> its expanded size, once known
    open_ids: set[int] = set()       # containers being counted (on the current path)

    def size(value) -> int:
        if not isinstance(value, (dict, list)):
            return 1
        key = id(value)
        if key in sizes:
            return sizes[key]
        if key in open_ids:
            raise InvalidJobError(f"{where}: a YAML alias refers to a node that contains it "
                                  f"(a value that holds itself)")
        open_ids.add(key)
        items = list(value.keys()) + list(value.values()) if isinstance(value, dict) else value
        total = 1
        for item in items:
            total += size(item)
            if total > MAX_VALUES:
                raise InvalidJobError(f"{where}: expands to more than {MAX_VALUES} values "
                                      f"(YAML aliases repeated within aliases?)")
        open_ids.discard(key)
        sizes[key] = total
        return total

    try:
        size(data)
    except RecursionError:
        raise InvalidJobError(f"{where}: nested too deeply") from None
