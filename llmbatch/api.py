"""The Python API: `run_job(path_or_dict, **overrides) -> JobResult`; the CLI is a thin wrapper.

    from llmbatch import run_job
    result = run_job("job.yaml", sampling={"max_new_tokens": 64}, sets=["shard.index=1"])
    result.stats["output_tok_s"], result.part_paths, result.num_rows_error

Keyword overrides are sections (dicts merged into the job's section) or top-level keys
(`on_row_error="fail"`); `sets` takes CLI-style "section.key=value" strings (a single string is
one override). Errors raise llmbatch.jobs.errors.JobError subclasses whose `exit_code` is what
the CLI would return, bad arguments to these functions included.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Iterable, Optional, Union

from llmbatch.jobs.errors import (EXIT_INTERNAL, EXIT_INVALID, EXIT_OK, EXIT_ROW_ERRORS,
                                  InternalError, InvalidInputError, InvalidJobError, JobError,
                                  ResumeError, RowError)
from llmbatch.jobs.loader import load_job
from llmbatch.jobs.progress import PROGRESS_MODES
from llmbatch.jobs.job_plan import JobPlan, JobResult
from llmbatch.jobs.runner import JobRunner
from llmbatch.jobs.spec import JobSpec
from llmbatch.lazy_imports import DATASETS, preload


def _as_sets(sets) -> tuple:
    """`sets` as a tuple of strings. One string is one override: iterating it would take each
    character for an override ('s': expected section.key=value)."""
    if isinstance(sets, str):
        return (sets,)
    if isinstance(sets, dict):   # iterating it took each key for a whole override
        raise InvalidJobError(f"sets takes 'section.key=value' strings, not a dict; pass "
                              f"{[f'{k}={v}' for k, v in sets.items()]!r}, or the dict's sections "
                              f"as keyword overrides")
    try:
        items = tuple(sets)
    except TypeError:
        items = None
    if items is None or not all(isinstance(item, str) for item in items):
        raise InvalidJobError(f"sets must be a 'section.key=value' string or a list of them, "
                              f"got {sets!r}")
    return items


def _check_run_arguments(progress, log_every_s, engine_factory) -> None:
    """The API's own arguments, checked before anything is planned or loaded: a mistake here
    is the caller's, like a bad job file, so it is a JobError too (exit 2), not a ValueError
    from deep inside the run after the model has loaded."""
    if progress not in PROGRESS_MODES:
        raise InvalidJobError(f"progress must be one of {', '.join(PROGRESS_MODES)}, "
                              f"got {progress!r}")
    if isinstance(log_every_s, bool) or not isinstance(log_every_s, (int, float)) \
            or math.isnan(log_every_s) or log_every_s < 0:
        raise InvalidJobError(f"log_every_s must be a number of seconds >= 0, "
                              f"got {log_every_s!r}")
    if engine_factory is not None and not callable(engine_factory):
        raise InvalidJobError(f"engine_factory must be callable (EngineConfig -> engine), got "
                              f"{type(engine_factory).__name__}")


def load(path_or_dict: Union[str, os.PathLike, dict], sets: Iterable[str] = (),
         **overrides) -> JobSpec:
    """Validate a job without running it (raises InvalidJobError)."""
    return load_job(path_or_dict, sets=_as_sets(sets), overrides=overrides)


def _preload_input_imports(spec: JobSpec) -> None:
    """datasets, for an input.dataset, imported once under the process-wide import lock
    (lazy_imports.py) before the input is opened: two jobs planned or run in threads at once
    would import it together (the engine's imports are preloaded by make_engine)."""
    if spec.input.dataset is not None:
        preload(DATASETS)


def _spec(path_or_dict, sets, overrides: dict) -> JobSpec:
    """A job file, dict or JobSpec as a JobSpec; overrides apply to the first two only."""
    if isinstance(path_or_dict, JobSpec):
        if _as_sets(sets) or overrides:   # they would be ignored silently
            raise InvalidJobError("sets and keyword overrides apply to a job file or dict; "
                                  "a JobSpec is already validated (use load(..., sets, "
                                  "**overrides) first)")
        return path_or_dict
    return load(path_or_dict, sets, **overrides)


def plan_job(path_or_dict: Union[str, os.PathLike, dict, JobSpec], sets: Iterable[str] = (),
             **overrides) -> JobPlan:
    """Shard range, rows already done and config hash; writes nothing, loads no model."""
    spec = _spec(path_or_dict, sets, overrides)
    _preload_input_imports(spec)
    return JobRunner(spec).plan()


def run_job(path_or_dict: Union[str, os.PathLike, dict, JobSpec], *, sets: Iterable[str] = (),
            progress: str = "none", log_every_s: float = 10.0,
            engine_factory: Optional[Callable] = None, **overrides) -> JobResult:
    """Run (or resume) one shard of a job and return its JobResult.

    `engine_factory(EngineConfig) -> engine` replaces the runtime engine (tests, custom engines).
    """
    _check_run_arguments(progress, log_every_s, engine_factory)
    spec = _spec(path_or_dict, sets, overrides)
    _preload_input_imports(spec)
    return JobRunner(spec, engine_factory=engine_factory, progress=progress,
                     log_every_s=log_every_s).run()


__all__ = ["run_job", "plan_job", "load", "JobResult", "JobPlan", "JobSpec", "JobError",
           "InvalidJobError", "InvalidInputError", "ResumeError", "RowError", "InternalError",
           "EXIT_OK", "EXIT_INTERNAL", "EXIT_INVALID", "EXIT_ROW_ERRORS"]
