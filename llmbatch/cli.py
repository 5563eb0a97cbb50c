"""`llmbatch` command line: run | validate | plan | merge | stats. Parsing and printing only.

Every failure is ONE line on stderr ("llmbatch: error: ...") with the contract's exit code:
2 invalid job/input (nothing written), 3 some rows errored, 1 internal error; stopped by
Ctrl-C 130 ("llmbatch: aborted"), by SIGTERM 143 ("llmbatch: terminated"). Set
LLMBATCH_DEBUG=1 to get tracebacks for internal errors.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from typing import Optional

import click

from llmbatch import __version__
from llmbatch.jobs.errors import EXIT_INTERNAL, EXIT_INVALID, InvalidJobError, JobError
from llmbatch.jobs.progress import QuietOnBrokenPipe, stderr_line

_SET = click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE",
                    help="Override one job key (value parsed as YAML); repeatable.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version=__version__, prog_name="llmbatch",
                      message="llmbatch %(version)s")
def cli() -> None:
    """Offline LLM batch inference: Parquet prompts in, ordered Parquet outputs and stats out."""


@cli.command()
@click.argument("job", type=click.Path(dir_okay=False))
@_SET
@click.option("--progress", type=click.Choice(["bar", "log", "none"]), default=None,
              help="bar (default on a terminal), log (a line every --log-every s) or none.")
@click.option("--log-every", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="Seconds between progress lines with --progress log.")
def run(job: str, sets: tuple, progress: Optional[str], log_every: float) -> None:
    """Run (or resume) a job: one shard of it under a SLURM array."""
    from llmbatch.api import run_job

    if progress is None:
        # (sys.stderr is None when Python started with descriptor 2 closed: `2>&-`)
        progress = "bar" if sys.stderr is not None and sys.stderr.isatty() else "log"
    with _warnings_to_stderr():
        result = run_job(job, sets=sets, progress=progress, log_every_s=log_every)
    s = result.stats
    tok_s = f"{s['output_tok_s']:.1f}" if s.get("output_tok_s") is not None else "-"
    hit = f"{100 * s['prefix_hit_rate']:.1f}%" if s.get("prefix_hit_rate") is not None else "-"
    _echo(f"shard {result.shard_index}/{result.shard_count}: {result.num_rows} rows "
          f"({result.num_rows_ok} ok, {result.num_rows_error} error, "
          f"{result.num_rows_skipped} resumed), {s['output_tokens']} output tokens, "
          f"{tok_s} out tok/s, prefix hit {hit}\n"
          f"output: {result.output_path}\nstats:  {result.stats_path}")
    sys.exit(result.exit_code)


def _echo(text: str) -> None:
    """A command's result on stdout. A reader gone (`| head -0`, or stdout closed from the
    start) leaves the exit code the command's: click made the broken pipe a silent exit 1 (an
    internal error, by the contract) for a job whose parts and stats were written, a valid job
    file, a merge whose file was written. The stream is then pointed at /dev/null
    (progress.QuietOnBrokenPipe, as for stderr), so later lines and the interpreter's final
    flush do not fail either."""
    print(text, file=QuietOnBrokenPipe(sys.stdout), flush=True)


@cli.command()
@click.argument("job", type=click.Path(dir_okay=False))
@_SET
def validate(job: str, sets: tuple) -> None:
    """Check a job file and print the effective config (defaults filled, overrides applied;
    a few optional keys at their defaults, e.g. model.lora, are left out)."""
    import yaml

    from llmbatch.api import load
    from llmbatch.io.hub_datasets import split_applies
    from llmbatch.io.sharding import resolve_shard

    spec = load(job, sets)
    try:
        spec.engine_config()
        spec.sampling_params()
    except ValueError as exc:
        raise InvalidJobError(f"invalid engine/sampling settings: {exc}") from None
    shard = resolve_shard(spec.shard.index, spec.shard.count)
    shown = spec.model_dump(mode="json")
    if not split_applies(spec.input):   # the default split, where it picks nothing
        del shown["input"]["split"]
    _echo(yaml.safe_dump(shown, sort_keys=False).rstrip())
    _echo(f"# shard {shard.index} of {shard.count}, config hash {spec.config_hash(shard.count)}")


@cli.command()
@click.argument("job", type=click.Path(dir_okay=False))
@_SET
def plan(job: str, sets: tuple) -> None:
    """Show the shard's row range and how much is already done; loads no model."""
    from llmbatch.api import plan_job

    p = plan_job(job, sets)
    total = p.row_end - p.row_start
    _echo(f"input: {p.input_description} ({p.num_input_rows} rows)")
    _echo(f"shard {p.shard.index} of {p.shard.count}: rows [{p.row_start}, {p.row_end}) "
          f"= {total} rows; {p.rows_done} done, {total - p.rows_done} to run")
    _echo(f"config hash: {p.config_hash}")


@cli.command()
@click.argument("output_dir", type=click.Path(file_okay=False))
@click.option("-o", "--out", "dest", required=True, type=click.Path(dir_okay=False),
              help="Parquet file to write (a name ending in .parquet, outside OUTPUT_DIR).")
@click.option("--overwrite", is_flag=True, help="Replace the --out file if it exists.")
@click.option("--allow-partial", is_flag=True,
              help="Merge the committed rows even if some are missing or a shard still runs.")
def merge(output_dir: str, dest: str, overwrite: bool, allow_partial: bool) -> None:
    """Concatenate all committed parts (shard, then part order) into one Parquet file;
    refuses one that lacks input rows unless --allow-partial."""
    from llmbatch.io.manifest import Manifest
    from llmbatch.io.merge import (check_complete, check_dest_folder, check_dest_format,
                                   check_one_config, check_parts_exist, coverage, summary,
                                   write_merged)
    from llmbatch.jobs.errors import InvalidInputError
    from llmbatch.jobs.path_checks import check_merge_dest
    from llmbatch.jobs.shard_lock import running_shards

    check_dest_format(dest)             # a wrong --out is named before the folder is read
    entries = Manifest(output_dir).entries()
    if not entries:
        raise InvalidInputError(f"{output_dir}: no committed parts (no _manifest entries)")
    check_dest_folder(dest)
    check_merge_dest(output_dir, dest, [os.path.join(output_dir, e["part"]) for e in entries],
                     overwrite)
    check_one_config(output_dir, entries)
    cov = coverage(output_dir, entries, running_shards(output_dir))
    if not allow_partial:
        check_complete(output_dir, cov)
    check_parts_exist(output_dir, entries)
    output_rows = write_merged(output_dir, entries, dest)
    # Input rows, as the coverage counts them; with sampling.n > 1 the file has n per row.
    input_rows = sum(e["row_end"] - e["row_start"] for e in entries)
    _echo(summary(len(entries), input_rows, dest, cov, num_output_rows=output_rows))


@cli.command()
@click.argument("output_dir", type=click.Path(file_okay=False))
def stats(output_dir: str) -> None:
    """Print the stats rows of an output folder (one per shard run)."""
    from llmbatch.jobs.errors import InvalidInputError
    from llmbatch.jobs.stats import read_stats

    table = read_stats(output_dir)
    if table.num_rows == 0:
        raise InvalidInputError(f"{output_dir}: no stats (no _stats/*.parquet)")
    for row in table.to_pylist():
        _echo(" ".join(f"{k}={v}" for k, v in row.items()))


class _StderrLines(logging.Handler):
    """The runtime warns through its logger (API users route it); the CLI prints each as one
    line like its own. Unhandled, Python printed them bare, without the 'llmbatch:' prefix."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"llmbatch: {record.levelname.lower()}: {record.getMessage()}", err=True)


@contextlib.contextmanager
def _warnings_to_stderr():
    """The runtime's warnings as 'llmbatch: warning: ...' lines while a CLI run lasts. The
    records do not propagate meanwhile: main() called in-process after logging.basicConfig
    printed each warning twice (once per handler). Both are undone afterwards, so a later
    run_job() in the same process is left as the library leaves it."""
    log = logging.getLogger("llmbatch")
    handler, propagate = _StderrLines(logging.WARNING), log.propagate
    log.addHandler(handler)
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.propagate = propagate


class Terminated(BaseException):
    """SIGTERM, raised in the main thread where it was running. A BaseException like
    KeyboardInterrupt, so the `except Exception` on its way (the runner's "engine failed") lets
    it through, and it unwinds the run as Ctrl-C does: finally blocks release the shard lock and
    stop tensor-parallel workers; nothing more is committed, so a resume finds what a SIGKILL
    at that point would leave (committed parts; temporaries it deletes)."""

    def __init__(self) -> None:
        super().__init__("received SIGTERM")


def _raise_terminated(signum, frame) -> None:
    # A second SIGTERM ends the process at once (the default action), as SLURM's SIGKILL after
    # its grace period does: a main thread blocked inside a C call (a collective) runs this
    # handler only when that call returns.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Terminated()


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM raises Terminated while the command runs (the main thread only: signal handlers
    can be set nowhere else), so it ends with one line and exit 143 like Ctrl-C's 130, instead
    of a silent death. The previous handler is put back (main() may run in-process)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def main(argv: Optional[list[str]] = None) -> int:
    """Console-script entry: turns every error into one line + exit code, never a traceback."""
    try:
        with _sigterm_raises():
            cli.main(args=argv, prog_name="llmbatch", standalone_mode=False)
    except Terminated:
        stderr_line("llmbatch: terminated")
        return 143
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0
    except click.exceptions.Abort:
        stderr_line("llmbatch: aborted")
        return 130
    except click.UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError" and exc.ctx is not None:
            click.echo(exc.ctx.get_help())       # bare `llmbatch`: the help, not an error
            return 0
        stderr_line(f"llmbatch: error: {exc.format_message()}")
        return EXIT_INVALID
    except click.ClickException as exc:         # other click errors: one line, exit 2
        stderr_line(f"llmbatch: error: {exc.format_message()}")
        return EXIT_INVALID
    except JobError as exc:
        stderr_line(f"llmbatch: error: {exc.message}")
        return exc.exit_code
    except KeyboardInterrupt:
        stderr_line("llmbatch: interrupted")
        return 130
    except Exception as exc:  # a bug: still one line unless asked for the traceback
        if os.environ.get("LLMBATCH_DEBUG"):
            raise
        msg = " ".join(str(exc).split())
        stderr_line(f"llmbatch: internal error: {type(exc).__name__}: {msg} "
                   f"(set LLMBATCH_DEBUG=1 for a traceback)")
        return EXIT_INTERNAL
    return 0


if __name__ == "__main__":
    sys.exit(main())
