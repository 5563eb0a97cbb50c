"""In-order, exactly-once commits of finished rows into part files.

Results arrive from the engine in any order. A finished row waits here until every earlier row
of the shard is finished; a part is always the next contiguous run of input rows, so part
boundaries depend only on (shard range, rows_per_part) and a resumed run writes the same parts
an uninterrupted one would. A part is committed in two atomic steps: its file is renamed into
place, then its manifest entry is written; only the manifest entry makes its rows count as done.
"""

from __future__ import annotations

import os
import signal
from typing import Callable, Optional

from llmbatch.io.input_digest import ENTRY_KEY as INPUT_DIGEST_KEY, RowDigests
from llmbatch.io.manifest import Manifest
from llmbatch.io.writer import rows_to_table, write_part
from llmbatch.jobs.errors import output_write_failed
from llmbatch.jobs.stats import versions

CRASH_ENV = "LLMBATCH_TEST_CRASH_AT"               # "stage:seq", test-only (see crash_hook)


def crash_hook(stage: str, seq: int) -> None:
    """Test seam: SIGKILL ourselves at `stage` of part `seq` (stages: before_rename,
    after_rename, after_commit) to prove exactly-once commits at each step."""
    target = os.environ.get(CRASH_ENV)
    if target and target == f"{stage}:{seq}":
        os.kill(os.getpid(), signal.SIGKILL)


class InOrderCommitter:
    def __init__(self, out_dir: str, manifest: Manifest, entries: list[dict], row_start: int,
                 row_end: int, rows_per_part: int, schema, part_meta: Callable[[], dict],
                 shard_index: int, digests: Optional[RowDigests] = None) -> None:
        """`entries`: the manifest entries of parts already committed (resume), in order.
        `part_meta()`: the job-level key-value metadata every part carries. `digests`: the
        input rows' digests (io/input_digest.py), fed as rows are read; each entry records
        its part's."""
        self.out_dir, self.manifest, self.schema = out_dir, manifest, schema
        self.digests = digests
        self.entries = entries
        self.row_end, self.rows_per_part = row_end, rows_per_part
        self.part_meta, self.shard_index = part_meta, shard_index
        resume_row = entries[-1]["row_end"] if entries else row_start
        self.resume_row = resume_row
        self.next_seq = len(entries)
        self.next_commit = resume_row          # first row not yet in a committed part
        self.ready_upto = resume_row           # rows [next_commit, ready_upto) are finished
        # row index -> its finished output rows (sampling.n of them, in sample order)
        self.finished: dict[int, list[dict]] = {}

    def finish(self, row_index: int, rows: list[dict]) -> None:
        self.finished[row_index] = rows
        while self.ready_upto in self.finished:
            self.ready_upto += 1

    def commit_ready(self) -> None:
        """Commit every full part that is ready, and the shard's last short part at the end.
        A write failure (a full disk) is one line, whoever called (the runner's result loop, or
        the input generator the engine pulls, for error rows)."""
        per_part = self.rows_per_part
        # A shard with no rows (a 0-row input, or more shards than rows) commits ONE empty
        # part: without it nothing in the folder tells "ran, empty" from "never ran", and a
        # 0-row job left no file holding the output schema (merge had nothing to write).
        empty = self.next_seq == 0 and self.next_commit == self.row_end
        while True:
            ready = self.ready_upto - self.next_commit
            if not (ready >= per_part or (ready > 0 and self.ready_upto == self.row_end)
                    or empty):
                return
            empty = False
            try:
                self._commit_part(min(ready, per_part))
            except OSError as exc:
                raise output_write_failed(exc) from exc

    @property
    def done(self) -> bool:
        return self.next_commit == self.row_end

    @property
    def num_errors(self) -> int:
        return sum(e["num_errors"] for e in self.entries)

    @property
    def part_paths(self) -> list[str]:
        return [os.path.join(self.out_dir, e["part"]) for e in self.entries]

    def _commit_part(self, num_rows: int) -> None:
        lo, hi = self.next_commit, self.next_commit + num_rows
        samples = [self.finished.pop(r) for r in range(lo, hi)]    # per input row
        rows = [row for per_input in samples for row in per_input]
        seq = self.next_seq
        meta = dict(self.part_meta(), seq=seq, row_start=lo, row_end=hi,
                    llmbatch_version=versions()["llmbatch_version"])
        table = rows_to_table(rows, self.schema)
        path = write_part(self.out_dir, self.shard_index, seq, table, meta,
                          crash_hook=lambda stage: crash_hook(stage, seq))
        # num_rows and num_errors count input rows (an input row with an error in any of
        # its samples is an error row), as JobResult and the stats do; the file's own row
        # count is recorded apart when sampling.n > 1 made it larger (Manifest checks it).
        entry = dict(meta, part=os.path.basename(path), num_rows=num_rows,
                     num_errors=sum(any(r["finish_reason"] == "error" for r in per_input)
                                    for per_input in samples),
                     ids=[per_input[0]["id"] for per_input in samples])
        if len(rows) != num_rows:
            entry["num_output_rows"] = len(rows)
        digest = self.digests.take(lo, hi) if self.digests is not None else None
        if digest is not None:
            entry[INPUT_DIGEST_KEY] = digest
        self.manifest.commit(entry)
        crash_hook("after_commit", seq)
        self.entries.append({k: v for k, v in entry.items() if k != "ids"})
        self.next_seq += 1
        self.next_commit = hi
