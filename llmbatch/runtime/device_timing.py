"""Per-step device timing with CUDA events (opt-in diagnostic; bench_batch1's last row).

What it answers: at batch 1 a decode step is ~0.9 ms and TPOT ~70 us more (stop 20, H200);
host time per step (schedule + prepare + postprocess) sums to ~30 us and the launch itself
reads 0.69 ms, but host-side stopwatches cannot say whether the GPU sat idle. Events recorded
on the compute stream can:

    start --(forward: input copies, model, LM head)--> mid --(sampling, token copy)--> end

    forward_s  elapsed(start, mid)         device time of the forward, incl. any wait for the
                                           host to enqueue the rest of it (eager launches)
    sample_s   elapsed(mid, end)
    gap_s      elapsed(previous end, start) the device idle between two steps: near zero when
                                           the host enqueues a step before the previous ends

What the gap cannot see: idle time INSIDE a step. The events are enqueued by the host around
its own launches, so while the host is still enqueueing a step (staging copies, then
cudaGraphLaunch, then the LM head and the sampler's launches) a device that has run out of
work idles within [start, end] and that time counts as forward or sampling. So gap_s is a
lower bound on host-induced idle; bench_batch1 adds the decode graph replayed back to back (no
host work between replays) as the device-only time of the graph for comparison. Other limits:
a draft model's forward (draft_proposer, outside launch) between two target steps counts as
the target's gap, and a tensor-parallel executor (no launch) times nothing.

A step's three events are read in `account`, called once its result has been waited for
(LaunchedStep.result), so elapsed_time never waits on the device except for `end`, which is
recorded right after the token copy that result() waited on. Steps finish in launch order
(one stream), so the previous accounted step's end precedes this step's start in the stream.

Off by default: three event records a step cost a few microseconds of host time, and a step
that samples nothing makes `account` wait for its end (under async scheduling that turns such
steps synchronous). Enable on a runner with `enable(runner)`; engine.stats() then reports
`device_timed_steps` and `{graph,prefill_graph,eager}_device_{forward,sample,gap}_s`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from llmbatch.runtime.launched_step import STEP_KINDS as KINDS

PARTS = ("forward", "sample", "gap")


def _cuda_event():
    import torch
    return torch.cuda.Event(enable_timing=True)


class StepMarks:
    """The three events of one step (start, mid, end), recorded as the step is enqueued."""

    __slots__ = ("start", "mid", "end")

    def __init__(self, make_event: Callable[[], Any]) -> None:
        self.start, self.mid, self.end = make_event(), make_event(), make_event()


class DeviceStepTimer:
    """Sums device seconds per step kind: forward, sampling, and the idle gap before the step.

    make_event: a factory of CUDA-event-like objects (record(), synchronize(),
    elapsed_time(other) in milliseconds); tests pass a fake."""

    def __init__(self, make_event: Callable[[], Any] = _cuda_event) -> None:
        self._make_event = make_event
        self._prev_end = None   # the last accounted step's end event
        self.steps = 0
        self.seconds = {f"{kind}_device_{part}_s": 0.0 for kind in KINDS for part in PARTS}

    def begin(self) -> StepMarks:
        marks = StepMarks(self._make_event)
        marks.start.record()
        return marks

    @staticmethod
    def after_forward(marks: StepMarks) -> None:
        marks.mid.record()

    @staticmethod
    def after_sampling(marks: StepMarks) -> None:
        marks.end.record()

    def account(self, kind: str, marks: StepMarks) -> None:
        """Add one step whose result the host has (its events up to `end` are complete, or
        about to be: end is synchronized here)."""
        marks.end.synchronize()
        s = self.seconds
        s[f"{kind}_device_forward_s"] += marks.start.elapsed_time(marks.mid) / 1e3
        s[f"{kind}_device_sample_s"] += marks.mid.elapsed_time(marks.end) / 1e3
        if self._prev_end is not None:
            # Device idle between the previous step's end and this one's start. Between two
            # requests (nothing to run) this includes the host's idle time too.
            s[f"{kind}_device_gap_s"] += max(0.0, self._prev_end.elapsed_time(marks.start) / 1e3)
        self._prev_end = marks.end
        self.steps += 1

    def stats(self) -> dict:
        return {"device_timed_steps": self.steps, **self.seconds}


def enable(runner, make_event: Callable[[], Any] = _cuda_event) -> DeviceStepTimer:
    """Time every following step of `runner` (a ModelRunner) on the device."""
    runner.device_timer = DeviceStepTimer(make_event)
    return runner.device_timer


def disable(runner) -> Optional[DeviceStepTimer]:
    """Stop timing; returns the timer that ran (its sums stay readable)."""
    timer = getattr(runner, "device_timer", None)
    runner.device_timer = None
    return timer
