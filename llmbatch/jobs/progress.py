"""Progress over rows: a tqdm bar, periodic log lines (for pipelines), or nothing.

Both go to stderr so stdout stays clean for the run summary. Log messages written while the bar
is shown go through tqdm.write, which redraws the bar below them instead of breaking it.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from typing import Optional

PROGRESS_MODES = ("bar", "log", "none")
GONE_ERRNOS = (errno.EPIPE, errno.EBADF)     # a stream no one reads any more


class QuietOnBrokenPipe:
    """A stream (stderr) whose reader going away (or a stderr closed from the start) silences
    it instead of ending the job:
    `llmbatch run job.yaml 2>&1 | head -3` died at the next progress line (BrokenPipeError,
    an internal error, no part written). Progress is for the reader, not a reason to stop.
    The descriptor is pointed at /dev/null, so later writes by anyone, and the interpreter's
    final flush, succeed too."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def _silence(self) -> None:
        try:
            to_devnull(self._stream.fileno())
        except (OSError, ValueError, AttributeError):  # no descriptor (a StringIO): let it be
            pass

    def write(self, text: str) -> int:
        if self._stream is None:          # Python started with the descriptor closed
            return len(text)
        try:
            return self._stream.write(text)
        except OSError as exc:
            self._silence_if_gone(exc)
            return len(text)

    def flush(self) -> None:
        if self._stream is None:
            return
        try:
            self._stream.flush()
        except OSError as exc:
            self._silence_if_gone(exc)

    def _silence_if_gone(self, exc: OSError) -> None:
        # EPIPE: the reader closed the pipe; EBADF: started with stderr closed (2>&-).
        if exc.errno not in GONE_ERRNOS:
            raise exc
        self._silence()

    def __getattr__(self, name):        # isatty, fileno, encoding: tqdm asks
        return getattr(self._stream, name)


def to_devnull(fd: int) -> None:
    """Point descriptor `fd` at /dev/null (it may be closed: os.open then returns it)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    if devnull != fd:
        os.dup2(devnull, fd)
        os.close(devnull)


def stderr_line(message: str) -> None:
    """One line on stderr that a closed stderr never turns into an error."""
    print(message, file=QuietOnBrokenPipe(sys.stderr), flush=True)


class Progress:
    def __init__(self, mode: str, total: int, initial: int = 0, log_every_s: float = 10.0,
                 desc: str = "rows", stream=None) -> None:
        if mode not in PROGRESS_MODES:
            raise ValueError(f"progress must be one of {', '.join(PROGRESS_MODES)}, got {mode!r}")
        self.mode = mode
        self.total = total
        self.done = initial
        self.initial = initial
        self.log_every_s = log_every_s
        self.stream = QuietOnBrokenPipe(stream if stream is not None else sys.stderr)
        self._start = time.perf_counter()
        self._last_log = self._start
        self._bar = None
        if mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit="row",
                             file=self.stream, dynamic_ncols=True, smoothing=0.1)

    def write(self, message: str) -> None:
        """A log line that never breaks the bar."""
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def update(self, rows: int, out_tok_s: float, prefix_hit_rate: Optional[float]) -> None:
        self.done += rows
        hit = "-" if prefix_hit_rate is None else f"{100 * prefix_hit_rate:.1f}%"
        if self._bar is not None:
            self._bar.update(rows)
            self._bar.set_postfix_str(f"out {out_tok_s:,.1f} tok/s, prefix hit {hit}",
                                      refresh=False)
        elif self.mode == "log":
            now = time.perf_counter()
            if now - self._last_log >= self.log_every_s or self.done >= self.total:
                self._last_log = now
                self._log_line(out_tok_s, hit, now)

    def _log_line(self, out_tok_s: float, hit: str, now: float) -> None:
        pct = 100.0 * self.done / self.total if self.total else 100.0
        rate = (self.done - self.initial) / max(now - self._start, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        print(f"llmbatch: {self.done}/{self.total} rows ({pct:.1f}%), out {out_tok_s:,.1f} tok/s, "
              f"prefix hit {hit}, elapsed {now - self._start:.0f}s, eta {eta:.0f}s",
              file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
