"""Paths a job names, checked before the model loads, and `llmbatch merge`'s destination,
checked before it writes (no torch, no writes).

A typo in a path must cost one line and exit 2 at once, not a model load (or minutes of hub
retries) followed by an internal error; a merge must never replace data it was not told to.
"""

from __future__ import annotations

import os
import re
from typing import Union

from llmbatch.hub_names import is_missing_local_path
from llmbatch.io.layout import foreign_entries, misshapen_entries
from llmbatch.jobs.errors import InvalidInputError, InvalidJobError


def check_local_path(key: str, path: str) -> None:
    """A name that is not a local path must read as a Hub id ("org/model", left to the
    loader; rule: llmbatch/hub_names.py). Fails fast instead of waiting on hub retries for a
    typo."""
    if is_missing_local_path(path):
        raise InvalidJobError(f"{key}: {path} does not exist")


def missing_dirs(folder: str) -> list[str]:
    """`folder` and its parents that do not exist, deepest first (what os.makedirs would make)."""
    missing = []
    while not os.path.exists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    return missing


def check_output_dir(key_value: str, out_dir: str) -> None:
    """output.path must be (or be creatable as) a directory we can write, checked before the
    model loads: otherwise a typo costs a model load and ends as an internal error."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise InvalidJobError(f"output.path {key_value} exists and is not a directory")
    if os.path.islink(out_dir) and not os.path.exists(out_dir):
        # makedirs() cannot follow it: "File exists" (exit 1) after the model loaded.
        raise InvalidJobError(f"output.path {key_value} is a symlink to "
                              f"{os.readlink(out_dir)}, which does not exist; create it or use "
                              f"another output.path")
    # The nearest existing ancestor is where os.makedirs will create the first new folder.
    missing = missing_dirs(out_dir)
    ancestor = os.path.dirname(missing[-1]) if missing else out_dir
    if not os.path.isdir(ancestor):
        raise InvalidJobError(f"output.path {key_value}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InvalidJobError(f"output.path {key_value}: {ancestor} is not writable")
    # Readers take the whole folder as one dataset, so foreign data there would be read as
    # results (or break the read); and cleanup never deletes what is not ours. Refuse rather
    # than mix. Hidden names (_SUCCESS, .crc, a user's _notes) are left alone.
    foreign = foreign_entries(out_dir)
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise InvalidJobError(f"output.path {key_value} holds {foreign[0]}{more}, not written by "
                              f"llmbatch; readers of the folder would mix it with the results: "
                              f"move it away or use another output.path")
    misshapen = misshapen_entries(out_dir)
    if misshapen:
        raise InvalidJobError(f"output.path {key_value}: {misshapen[0]} (llmbatch writes it); "
                              f"move it away or use another output.path")


# One name of each kind llmbatch writes under output.path (io/layout.py): a glob input that
# matches any of them would read the job's own output on a later run.
_WRITTEN_SAMPLES = ("part-00000-00000.parquet", "_tmp-part-00000-00000.parquet.1", "_lock-00000",
                    "_manifest/part-00000-00000.json", "_stats/stats-00000-000.parquet")
_OWN_OUTPUT = "a rerun would read the job's own output as input"
_OUTSIDE = "use an output.path outside the input"


def _glob_regex(pattern: str) -> "re.Pattern[str]":
    """fsspec's glob rules as a regex: '*' and '?' stay within one path component, '**'
    crosses any number of them ('**/' also none), '[...]' is a character class."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2:]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1:end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _inside(child: str, parent: str) -> bool:
    return os.path.commonpath([child, parent]) == parent


def check_input_output_overlap(input_path: Union[str, list[str]], out_dir: str,
                               key: str = "input.path") -> None:
    """No input.path entry may lie inside output.path (readers of the output would take it as
    results), equal it, or hold it where the job's reader would find the parts on a rerun: the
    tester's `input.path: out/b2`, `output.path: out/b2/chain` exited 0 once, then every rerun
    read its own parts as input. An output folder below the input, or an input below the
    output, under a name starting with `_` or `.` is fine: our reader, pyarrow, Spark and
    DuckDB all skip such names. URLs other than file:// cannot name the local output folder.
    `key` names the input in messages: a local input.dataset folder is checked alike (a data
    folder loaded with `datasets` reads every data file in it, parts included)."""
    out_abs = os.path.abspath(os.path.expanduser(out_dir))
    out_real = os.path.realpath(out_abs)
    for entry in [input_path] if isinstance(input_path, str) else input_path:
        path = entry[len("file://"):] if entry.startswith("file://") else entry
        if "://" in path:
            continue
        absolute = os.path.abspath(os.path.expanduser(path))
        if any(ch in absolute for ch in "*?["):
            # What the glob may match after a run, not only what it matches now.
            regex = _glob_regex(absolute)
            if any(regex.match(os.path.join(root, sample)) for root in {out_abs, out_real}
                   for sample in _WRITTEN_SAMPLES):
                raise InvalidJobError(f"{key} {entry} would match files under output.path "
                                      f"{out_dir}: {_OWN_OUTPUT}; {_OUTSIDE}")
            continue
        real = os.path.realpath(absolute)
        if real == out_real:
            raise InvalidJobError(f"{key} {entry} and output.path {out_dir} are the same "
                                  f"folder: {_OWN_OUTPUT}; {_OUTSIDE}")
        inner = os.path.relpath(real, out_real).split(os.sep)
        if _inside(real, out_real) and not any(part.startswith(("_", ".")) for part in inner):
            # (Input kept under a _ or . name of the output folder is fine: readers of the
            # results, check_output_dir and overwrite's clean-up all pass such names by.)
            raise InvalidJobError(f"{key} {entry} is inside output.path {out_dir}: the input "
                                  f"would be mixed with the results; {_OUTSIDE}")
        below = os.path.relpath(out_real, real).split(os.sep)
        if os.path.isdir(real) and _inside(out_real, real) \
                and not any(part.startswith(("_", ".")) for part in below):
            raise InvalidJobError(f"output.path {out_dir} is inside {key} {entry}: "
                                  f"{_OWN_OUTPUT}; {_OUTSIDE} (or a folder whose name starts "
                                  f"with _ or .)")


def check_merge_dest(output_dir: str, dest: str, parts: list[str], overwrite: bool) -> None:
    """`llmbatch merge output_dir -o dest` may write `dest` only outside `output_dir` (a later
    read of the folder would return the merged rows twice), never over one of its `parts`
    (paths of the committed part files: one may be a link to a file elsewhere), and over an
    existing file only with `overwrite`."""
    # What os.replace(tmp, dest) replaces: the entry `dest` names in its (resolved) folder.
    folder = os.path.realpath(os.path.dirname(os.path.abspath(dest)))
    target = os.path.join(folder, os.path.basename(dest))
    root = os.path.realpath(output_dir)
    if os.path.commonpath([root, target]) == root:
        raise InvalidInputError(f"--out {dest}: inside the merged folder {output_dir} (a later "
                                f"read of the folder would return the merged rows twice); "
                                f"write it elsewhere")
    for part in parts:
        if os.path.realpath(part) == target:
            raise InvalidInputError(f"--out {dest}: is committed part {part}, an input of this "
                                    f"merge; write it elsewhere")
    if os.path.lexists(dest) and not overwrite:
        raise InvalidInputError(f"--out {dest}: already exists; pass --overwrite to replace it")


# Part names carry the sequence number zero-padded to 5 digits, and readers of the folder
# (pyarrow.dataset, Spark, DuckDB) take the files in name order: part 100000 would sort
# before part 99999 and its rows would read out of input order.
MAX_PARTS_PER_SHARD = 100_000


def check_part_count(parts_done: int, rows_left: int, rows_per_part: int) -> None:
    """InvalidJobError (before the model loads) when finishing the shard would need more than
    MAX_PARTS_PER_SHARD parts: `parts_done` committed, `rows_left` rows still to commit."""
    parts = parts_done + -(-rows_left // rows_per_part)
    if parts > MAX_PARTS_PER_SHARD:
        raise InvalidJobError(
            f"output.rows_per_part: {rows_per_part} would split this shard into {parts} parts, "
            f"more than {MAX_PARTS_PER_SHARD} (part names sort out of input order past that); "
            f"raise output.rows_per_part or shard.count")
