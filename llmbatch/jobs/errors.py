"""Errors a job can end with, each carrying the process exit code the CLI returns (no torch).

Exit codes are part of the user-facing contract:
  0  every row finished without error
  1  internal error (a bug, or an unexpected failure of the runtime)
  2  invalid job file or input; nothing was written (also `on_row_error: fail` on the first bad row
     and input failing to read part-way, which keep the parts committed before it)
  3  the job finished but some rows recorded errors (finish_reason == "error")
  130, 143  the CLI was stopped by SIGINT (Ctrl-C) / SIGTERM (cli.py; committed parts are kept)
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_INVALID = 2
EXIT_ROW_ERRORS = 3


class JobError(Exception):
    """Base class: a one-line, user-facing message plus an exit code."""

    exit_code = EXIT_INTERNAL

    def __init__(self, message: str) -> None:
        # One line, always: the CLI prints it verbatim on stderr.
        super().__init__(" ".join(str(message).split()))

    @property
    def message(self) -> str:
        return str(self)


class InvalidJobError(JobError):
    """The job file, its overrides or the environment it refers to are invalid."""

    exit_code = EXIT_INVALID


class InvalidInputError(JobError):
    """The input data does not match the job (missing column, unreadable path, ...)."""

    exit_code = EXIT_INVALID


class ResumeError(JobError):
    """The output folder cannot be resumed (other config, damaged manifest, mode: error)."""

    exit_code = EXIT_INVALID


class RowError(JobError):
    """A bad row under `on_row_error: fail`: the job stops at the first one."""

    exit_code = EXIT_INVALID


class InternalError(JobError):
    exit_code = EXIT_INTERNAL


def output_write_failed(exc: OSError) -> InternalError:
    """A part or stats write that failed (a full disk): one line naming the output, not the
    engine that happened to be running."""
    return InternalError(f"writing the output failed: {type(exc).__name__}: {exc}")
