"""Paths a job names, checked before the model loads, and `llmbatch merge`'s destination,
checked before it writes (no torch, no writes).

A typo in a path must cost one line and exit 2 at once, not a model load (or minutes of hub
retries) followed by an internal error; a merge must never replace data it was not told to.
"""

from __future__ import annotations

import os

from llmbatch.io.layout import foreign_entries
from llmbatch.jobs.errors import InvalidInputError, InvalidJobError


def check_local_path(key: str, path: str) -> None:
    """A path written as a local path must exist; a bare name ("org/model") may be a hub id,
    left to the loader. Fails fast instead of waiting on hub retries for a typo."""
    looks_local = path.startswith((".", "/", "~")) or os.sep + os.sep in path \
        or path.count("/") > 1
    if looks_local and not os.path.exists(os.path.expanduser(path)):
        raise InvalidJobError(f"{key}: {path} does not exist")


def check_output_dir(key_value: str, out_dir: str) -> None:
    """output.path must be (or be creatable as) a directory we can write, checked before the
    model loads: otherwise a typo costs a model load and ends as an internal error."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise InvalidJobError(f"output.path {key_value} exists and is not a directory")
    # The nearest existing ancestor is where os.makedirs will create the first new folder.
    ancestor = out_dir
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
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
