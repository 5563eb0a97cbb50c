"""What a run of one shard would do (JobPlan, computed without writing) and what it did
(JobResult, returned by run_job); runner.py makes both. Rows are input rows throughout: with
sampling.n > 1 each has n output rows, which these counts do not multiply."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from llmbatch.io.sharding import Shard
from llmbatch.jobs.errors import EXIT_OK, EXIT_ROW_ERRORS


@dataclass
class JobPlan:
    """What a run would do; computed without writing anything."""

    shard: Shard
    num_input_rows: int
    row_start: int
    row_end: int
    rows_done: int                # rows of committed parts (intact ones, when checked)
    config_hash: str
    input_description: str
    settings: dict                # what config_hash hashes; each manifest entry records it


@dataclass
class JobResult:
    output_path: str
    part_paths: list[str]
    stats_path: Optional[str]
    stats: dict
    num_rows: int                 # rows of this shard
    num_rows_ok: int              # over the whole shard, including rows of earlier runs
    num_rows_error: int
    num_rows_skipped: int         # already committed by an earlier run
    config_hash: str
    shard_index: int
    shard_count: int
    extra: dict = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return EXIT_ROW_ERRORS if self.num_rows_error else EXIT_OK
