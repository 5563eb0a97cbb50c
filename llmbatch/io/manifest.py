"""The manifest: which parts (and so which input rows) of a shard are committed (no torch).

Layout under output.path:
  part-SSSSS-QQQQQ.parquet          result rows of shard S, part Q (contiguous input rows)
  _manifest/part-SSSSS-QQQQQ.json   commit record of that part: row range, ids, hash, counts
  _stats/stats-SSSSS-RRR.parquet    statistics of run R of shard S

Commit protocol (exactly-once after a kill at any point): the part file is renamed into place
first, THEN its manifest entry is written atomically. A part file without an entry is an
uncommitted leftover and is deleted on restart; its rows are simply produced again. Because
rows are committed strictly in input order, a shard's committed rows are always a prefix of its
row range, and resuming means starting at the end of the last committed part.

A committed part found damaged or missing on resume (file gone, footer unreadable, or not the
row count its entry records: a deleted or truncated copy, a full disk, a hand edit) is
un-committed together with every later part of its shard, so the committed rows stay a prefix
and the ordinary resume produces them again (same part names and boundaries: they depend only on
the shard range and rows_per_part).
"""

from __future__ import annotations

import json
import os
from typing import Optional

from llmbatch.io.config_diff import why_written_differently
from llmbatch.io.layout import (ENTRY_RE, ENTRY_TMP_RE, MANIFEST_DIR, PART_RE, PART_TMP_RE,
                                STATS_DIR, deletable_shard)
from llmbatch.io.writer import MISSING, part_defect, part_name, write_atomic_bytes
from llmbatch.jobs.errors import ResumeError

__all__ = ["Manifest", "MANIFEST_DIR", "STATS_DIR"]


def _check_entry_shape(entry, name: str) -> None:
    """ValueError unless `entry` (a manifest file's JSON) is what the committer writes: a dict
    whose integer shard and seq match its file name `name`, integer row_start <= row_end,
    and part naming the part file of that shard and seq. A hand-edited entry failed later as
    an internal error (KeyError, TypeError), and a `part` of "../x" read, or had recovery
    delete, a file outside the folder."""
    if not isinstance(entry, dict):
        raise ValueError(f"a JSON {type(entry).__name__}, not an object")
    for key in ("shard", "seq", "row_start", "row_end"):
        if type(entry.get(key)) is not int:
            raise ValueError(f"{key} is {entry.get(key)!r}, not an integer")
    if not 0 <= entry["row_start"] <= entry["row_end"]:
        raise ValueError(f"rows [{entry['row_start']}, {entry['row_end']}) are not a range")
    if name != part_name(entry["shard"], entry["seq"]).replace(".parquet", ".json") \
            or entry.get("part") != part_name(entry["shard"], entry["seq"]):
        raise ValueError(f"part {entry.get('part')!r} with shard {entry['shard']} and seq "
                         f"{entry['seq']} does not match the entry's name")


class Manifest:
    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.dir = os.path.join(out_dir, MANIFEST_DIR)
        # Set by recover(): what it un-committed because a part was damaged, for the run's log.
        self.dropped: Optional[str] = None

    # -- reading ---------------------------------------------------------------------------
    def entries(self, shard: Optional[int] = None) -> list[dict]:
        """Committed entries (of one shard, or all), sorted by (shard, seq)."""
        if not os.path.isdir(self.dir):
            return []
        found = []
        for name in os.listdir(self.dir):
            m = ENTRY_RE.match(name)
            if not m or (shard is not None and int(m.group(1)) != shard):
                continue
            try:
                with open(os.path.join(self.dir, name), encoding="utf-8") as f:
                    entry = json.load(f)
                _check_entry_shape(entry, name)
                found.append(entry)
            except FileNotFoundError:
                continue   # removed since the listing (another shard un-committing its own)
            except (OSError, ValueError) as exc:
                raise ResumeError(f"output.path {self.out_dir}: unreadable manifest entry {name} "
                                  f"({exc}); set output.mode: overwrite to start over") from None
        return sorted(found, key=lambda e: (e["shard"], e["seq"]))

    def shard_files(self, shard: int) -> tuple[list[str], list[str]]:
        """(part files, temporary files) of one shard present in the output folder."""
        parts, temps = [], []
        if os.path.isdir(self.out_dir):
            for name in os.listdir(self.out_dir):
                m = PART_RE.match(name)
                if m and int(m.group(1)) == shard:
                    parts.append(name)
                m = PART_TMP_RE.match(name)
                if m and int(m.group(1)) == shard:
                    temps.append(name)
        return sorted(parts), temps

    def check_hash(self, config_hash: str, settings: dict, shard: int, shard_count: int,
                   entries: Optional[list[dict]] = None) -> None:
        """Refuse to resume output written under another config (any shard), in one line
        saying why (config_diff.py: the settings that differ, or an earlier llmbatch version)
        and what output.mode: overwrite would delete (the committed rows it clears for
        `shard`, as clear() does), so the way out is not to delete rows unknowingly.
        entries: every shard's entries as entries() returns them, when the caller read them."""
        if entries is None:
            entries = self.entries()
        other = next((e for e in entries if e.get("config_hash") != config_hash), None)
        if other is None:
            return
        why, remedy = why_written_differently(other, settings, config_hash)
        raise ResumeError(f"output.path {self.out_dir} {why}; {remedy}, use another "
                          f"output.path, or set output.mode: overwrite (deletes "
                          f"{_overwritten(entries, shard, shard_count)})")

    def has_results(self, shard: int) -> bool:
        parts, _ = self.shard_files(shard)
        return bool(parts) or bool(self.entries(shard))

    def refuse_parts_beyond(self, shard_count: int, key_value: str) -> None:
        """ResumeError (exit 2) when the folder holds part files of a shard index >= shard_count
        (an earlier run with more shards, its manifest gone or ignored): no task of this job
        writes or deletes them, so readers of the folder would take their rows as this job's
        (rows read twice). output.mode: overwrite deletes them (clear); so may the user.
        `key_value`: output.path as the job spells it."""
        if not os.path.isdir(self.out_dir):
            return
        beyond = sorted(name for name in os.listdir(self.out_dir)
                        if (m := PART_RE.match(name)) and int(m.group(1)) >= shard_count)
        if beyond:
            more = f" and {len(beyond) - 1} more" if len(beyond) > 1 else ""
            raise ResumeError(f"output.path {key_value} holds {beyond[0]}{more}: parts of a shard "
                              f"index >= {shard_count}, which a job of {shard_count} "
                              f"shard{'s' if shard_count > 1 else ''} never writes, so readers "
                              f"would take their rows as this job's; set output.mode: overwrite "
                              f"(it deletes them) or remove them")

    # -- resuming --------------------------------------------------------------------------
    def first_damaged(self, entries: list[dict]) -> Optional[tuple[int, str]]:
        """(index in `entries`, why) of the first committed part whose file is damaged or
        missing (why == MISSING), or None. Reads part footers only; writes nothing."""
        for i, entry in enumerate(entries):
            why = part_defect(os.path.join(self.out_dir, entry["part"]), entry)
            if why is not None:
                return i, why
        return None

    def contiguous(self, entries: list[dict], shard: int, row_start: int) -> list[dict]:
        """`shard`'s entries among `entries` (sorted by seq), checked to be seq 0, 1, ... with
        rows following on from `row_start` (ResumeError otherwise). Run and plan check it
        before the model loads."""
        entries = [e for e in entries if e["shard"] == shard]
        expected_row = row_start
        for seq, entry in enumerate(entries):
            if entry["seq"] != seq:      # named: it was "not contiguous at" the next part
                gap = (f"the manifest entry of part {part_name(shard, seq)} is missing (the "
                       f"next is {entry['part']})")
            elif entry["row_start"] != expected_row:
                gap = (f"part {entry['part']} starts at row {entry['row_start']}, where row "
                       f"{expected_row} was due")
            else:
                expected_row = entry["row_end"]
                continue
            raise ResumeError(f"output.path {self.out_dir}: manifest of shard {shard} is not "
                              f"contiguous: {gap}; set output.mode: overwrite")
        return entries

    def recover(self, shard: int, row_start: int) -> list[dict]:
        """Drop uncommitted leftovers of `shard`; return its committed entries (checked to be
        contiguous from `row_start`), cut before the first damaged or missing part."""
        entries = self.contiguous(self.entries(shard), shard, row_start)
        entries = self._uncommit_damaged(entries)
        committed = {e["part"] for e in entries}
        parts, temps = self.shard_files(shard)
        for name in temps + [p for p in parts if p not in committed]:
            os.remove(os.path.join(self.out_dir, name))
        # Only this shard's manifest temporaries: another array task may be mid-commit.
        for name in os.listdir(self.dir) if os.path.isdir(self.dir) else []:
            m = ENTRY_TMP_RE.match(name)
            if m and int(m.group(1)) == shard:
                os.remove(os.path.join(self.dir, name))
        return entries

    def _uncommit_damaged(self, entries: list[dict]) -> list[dict]:
        """Remove the manifest entries from the first damaged (or missing) part on, last
        first: a kill midway leaves a shorter prefix that still holds that part, found again
        on the next resume. Their part files are then uncommitted leftovers that recover()
        deletes."""
        found = self.first_damaged(entries)
        if found is None:
            return entries
        first, why = found
        for entry in reversed(entries[first:]):
            os.remove(os.path.join(self.dir, _entry_name(entry["part"])))
        later = len(entries) - first - 1
        state = why if why == MISSING else f"damaged ({why})"
        self.dropped = (f"committed part {entries[first]['part']} is {state}; its rows"
                        + (f" and those of the {later} part{'s' if later > 1 else ''} after it"
                           if later else "")
                        + " are produced again")
        return entries[:first]

    # -- writing ---------------------------------------------------------------------------
    def commit(self, entry: dict) -> None:
        os.makedirs(self.dir, exist_ok=True)
        name = _entry_name(part_name(entry["shard"], entry["seq"]))
        data = json.dumps(entry, sort_keys=True, default=str).encode()
        write_atomic_bytes(os.path.join(self.dir, name), data)

    def clear(self, shard: int, all_shards: bool, shard_count: Optional[int] = None) -> None:
        """output.mode: overwrite. Removes only llmbatch's own files (the exact names of
        layout.py: parts, manifest entries, stats, their temporaries; never a lock file, never
        a name that merely starts like ours) — of every shard when the job has one shard, else
        of this shard only, so array tasks running side by side never delete each other's work.
        Files of shard indices >= shard_count belong to an earlier layout with more shards (no
        task of this job owns them), so they go too: otherwise their rows would be read twice.
        With all shards cleared, `_manifest/` and `_stats/` go when nothing else is left."""
        if not os.path.isdir(self.out_dir):
            return

        def ours(index: Optional[int]) -> bool:
            return index is not None and (all_shards or index == shard or (
                shard_count is not None and index >= shard_count))

        for folder in ("", MANIFEST_DIR, STATS_DIR):
            path = os.path.join(self.out_dir, folder)
            if not os.path.isdir(path):
                continue
            for name in os.listdir(path):
                if ours(deletable_shard(folder, name)):
                    os.remove(os.path.join(path, name))
            # Only when no other shard can be committing into it (a one-shard job).
            if folder and all_shards and not os.listdir(path):
                os.rmdir(path)


def _overwritten(entries: list[dict], shard: int, shard_count: int) -> str:
    """'the 50 committed rows' (of shard 0) that output.mode: overwrite clears for `shard`:
    every shard's of a one-shard job, else this shard's and those of shards >= shard_count."""
    cleared = [e for e in entries
               if shard_count == 1 or e["shard"] == shard or e["shard"] >= shard_count]
    rows = sum(e["row_end"] - e["row_start"] for e in cleared)
    shards = sorted({e["shard"] for e in cleared})
    of = f" of shard{'s' if len(shards) > 1 else ''} {', '.join(map(str, shards))}" \
        if shard_count > 1 and shards else ""
    return f"the {rows} committed row{'s' if rows != 1 else ''}{of}"


def _entry_name(part: str) -> str:
    """part-SSSSS-QQQQQ.parquet -> its manifest entry's name, part-SSSSS-QQQQQ.json."""
    return part[: -len(".parquet")] + ".json"
