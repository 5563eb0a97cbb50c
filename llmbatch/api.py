"""The Python API: `run_job(path_or_dict, **overrides) -> JobResult`; the CLI is a thin wrapper.

    from llmbatch import run_job
    result = run_job("job.yaml", sampling={"max_new_tokens": 64}, sets=["shard.index=1"])
    result.stats["output_tok_s"], result.part_paths, result.num_rows_error

Keyword overrides are sections (dicts merged into the job's section) or top-level keys
(`on_row_error="fail"`); `sets` takes CLI-style "section.key=value" strings. Errors raise
llmbatch.jobs.errors.JobError subclasses whose `exit_code` is what the CLI would return.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable, Optional, Union

from llmbatch.jobs.errors import (EXIT_INTERNAL, EXIT_INVALID, EXIT_OK, EXIT_ROW_ERRORS,
                                  InternalError, InvalidInputError, InvalidJobError, JobError,
                                  ResumeError, RowError)
from llmbatch.jobs.loader import load_job
from llmbatch.jobs.runner import JobPlan, JobResult, JobRunner
from llmbatch.jobs.spec import JobSpec


def load(path_or_dict: Union[str, os.PathLike, dict], sets: Iterable[str] = (),
         **overrides) -> JobSpec:
    """Validate a job without running it (raises InvalidJobError)."""
    return load_job(path_or_dict, sets=sets, overrides=overrides)


def plan_job(path_or_dict, sets: Iterable[str] = (), **overrides) -> JobPlan:
    """Shard range, rows already done and config hash; writes nothing, loads no model."""
    return JobRunner(load(path_or_dict, sets, **overrides)).plan()


def run_job(path_or_dict: Union[str, os.PathLike, dict, JobSpec], *, sets: Iterable[str] = (),
            progress: str = "none", log_every_s: float = 10.0,
            engine_factory: Optional[Callable] = None, **overrides) -> JobResult:
    """Run (or resume) one shard of a job and return its JobResult.

    `engine_factory(EngineConfig) -> engine` replaces the runtime engine (tests, custom engines).
    """
    spec = path_or_dict if isinstance(path_or_dict, JobSpec) else \
        load(path_or_dict, sets, **overrides)
    return JobRunner(spec, engine_factory=engine_factory, progress=progress,
                     log_every_s=log_every_s).run()


__all__ = ["run_job", "plan_job", "load", "JobResult", "JobPlan", "JobSpec", "JobError",
           "InvalidJobError", "InvalidInputError", "ResumeError", "RowError", "InternalError",
           "EXIT_OK", "EXIT_INTERNAL", "EXIT_INVALID", "EXIT_ROW_ERRORS"]
