"""The exact names llmbatch writes in an output folder, and what else a folder may hold (no torch).

  part-SSSSS-QQQQQ.parquet                    result rows (writer.write_part)
  _tmp-part-SSSSS-QQQQQ.parquet.PID           its temporary before the rename
  _lock-SSSSS                                 one run per shard (jobs/shard_lock.py)
  _manifest/part-SSSSS-QQQQQ.json             commit record of a part (manifest.Manifest.commit)
  _manifest/_tmp-part-SSSSS-QQQQQ.json.PID    its temporary (writer.write_atomic_bytes)
  _stats/stats-SSSSS-RRR.parquet              stats of run R of shard S (jobs/stats.write_stats)
  _stats/_tmp-stats-SSSSS-RRR.parquet.PID     its temporary

Cleanup (`output.mode: overwrite`, recovery after a kill) deletes only names matching these
patterns, never a mere prefix: a Spark `part-00000-<uuid>.snappy.parquet` or a user's
`_stats/README` is not ours. Lock files are never deleted: the one of a running shard is held.
"""

from __future__ import annotations

import os
import re
from typing import Optional

MANIFEST_DIR = "_manifest"
STATS_DIR = "_stats"

PART_RE = re.compile(r"^part-(\d{5,})-(\d{5,})\.parquet$")
PART_TMP_RE = re.compile(r"^_tmp-part-(\d{5,})-(\d{5,})\.parquet\.\d+$")
ENTRY_RE = re.compile(r"^part-(\d{5,})-(\d{5,})\.json$")
ENTRY_TMP_RE = re.compile(r"^_tmp-part-(\d{5,})-(\d{5,})\.json\.\d+$")
STATS_RE = re.compile(r"^stats-(\d{5,})-(\d{3,})\.parquet$")
STATS_TMP_RE = re.compile(r"^_tmp-stats-(\d{5,})-(\d{3,})\.parquet\.\d+$")

# Deletable names per folder ("" = the output folder itself); group 1 is the shard index.
_DELETABLE = {
    "": (PART_RE, PART_TMP_RE),
    MANIFEST_DIR: (ENTRY_RE, ENTRY_TMP_RE),
    STATS_DIR: (STATS_RE, STATS_TMP_RE),
}
# What pyarrow.dataset, Spark, DuckDB and HF `datasets` skip when they read a folder.
_HIDDEN_PREFIXES = ("_", ".")


def deletable_shard(folder: str, name: str) -> Optional[int]:
    """The shard of `name` if llmbatch wrote it in `folder` (one of _DELETABLE's keys) and may
    delete it, else None."""
    for pattern in _DELETABLE.get(folder, ()):
        m = pattern.match(name)
        if m:
            return int(m.group(1))
    return None


def foreign_entries(out_dir: str) -> list[str]:
    """Names in `out_dir` that readers of the folder would read as data but llmbatch did not
    write (anything not hidden that is not one of our part files), sorted. A part-named entry
    is ours unless it is a directory: another shard may delete one of its parts between the
    listing and the check (a requeued task clearing its leftovers), and a vanished file must
    not make this run refuse."""
    if not os.path.isdir(out_dir):
        return []
    return sorted(name for name in os.listdir(out_dir)
                  if not name.startswith(_HIDDEN_PREFIXES)
                  and not (PART_RE.match(name) and not os.path.isdir(os.path.join(out_dir, name))))


LOCK_RE = re.compile(r"^_lock-(\d{5,})$")


def misshapen_entries(out_dir: str) -> list[str]:
    """Names llmbatch writes in `out_dir` that are there as the other kind of thing: a file
    named _manifest or _stats (llmbatch makes them folders), a folder named like a lock file.
    Found before a run, not as an internal error when the first part commits or the stats are
    written after all the work."""
    if not os.path.isdir(out_dir):
        return []
    found = []
    for name in sorted(os.listdir(out_dir)):
        path = os.path.join(out_dir, name)
        if name in (MANIFEST_DIR, STATS_DIR) and not os.path.isdir(path):
            found.append(f"{name} is not a folder")
        elif LOCK_RE.match(name) and os.path.isdir(path):
            found.append(f"{name} is a folder, not a lock file")
    return found
