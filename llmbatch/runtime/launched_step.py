"""After a step is launched: waiting for its sampled tokens (LaunchedStep) and turning the
sampler's rows into tokens per request (collect_sampled): drafts cut to the accepted ones plus
one, logprobs appended to the requests.

ModelRunner.launch returns a LaunchedStep; the engine calls result() once, at once for a
synchronous step, one step later under async scheduling (docs/async_scheduling.md).
"""

from __future__ import annotations

import logging
import time
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Optional

from llmbatch.runtime.spec_decode import num_accepted
from llmbatch.runtime.step_inputs import StepInputs

if TYPE_CHECKING:
    from llmbatch.runtime.model_runner import ModelRunner

logger = logging.getLogger(__name__)

# How a step ran (LaunchedStep's kind): a decode / verify graph replay (cuda_graphs.py), a
# one-sequence prefill graph replay (prefill_graphs.py) or an eager forward. The runner's
# step-time stats and device timing keep one entry per kind.
STEP_KINDS = ("graph", "prefill_graph", "eager")

# Read for every sampled row every step (map() with it runs in C).
_spec_token_ids = attrgetter("spec_token_ids")


class LaunchedStep:
    """A step enqueued on the device; result() waits for its sampled tokens (once)."""

    def __init__(self, runner: ModelRunner, s: StepInputs, pending, kind: str,
                 launch_s: float, device_marks=None) -> None:
        self.runner, self.inputs, self.pending = runner, s, pending
        self._kind, self._launch_s = kind, launch_s
        # The step's CUDA events when runner.device_timer is on (runtime/device_timing.py).
        self._device_marks = device_marks
        self._sampled: Optional[dict[Any, list[int]]] = None

    def result(self) -> dict[Any, list[int]]:
        if self._sampled is None:
            t0 = time.perf_counter()
            self._sampled = ({} if self.pending is None
                             else collect_sampled(self.inputs, self.pending.result()))
            # Forward + sampling wall time the host saw (launching, then waiting for the
            # tokens), split by whether the step replayed a CUDA graph (engine stats).
            runner = self.runner
            runner.step_time_s[self._kind] += self._launch_s + time.perf_counter() - t0
            runner.step_launch_s[self._kind] += self._launch_s
            runner.step_count[self._kind] += 1
            if self._device_marks is not None and runner.device_timer is not None:
                try:
                    runner.device_timer.account(self._kind, self._device_marks)
                except Exception as exc:   # a diagnostic must never break a step
                    logger.warning("device timing off: %s: %s", type(exc).__name__, exc)
                    runner.device_timer = None
        return self._sampled


def collect_sampled(s: StepInputs, result) -> dict[Any, list[int]]:
    """A SamplerOutput -> sampled token ids per request id; speculative rows are cut to the
    accepted drafts + one, and logprobs are appended to the requests. A request finished
    while the step was in flight (async scheduling) gets nothing appended."""
    reqs = s.sample_requests
    if not (result.logprobs and any(result.logprobs)) and not any(map(_spec_token_ids, reqs)):
        # Fast path (every step without logprobs or drafts): one row, one token per request.
        return {req.request_id: [token] for req, token in zip(reqs, result.token_ids)}
    sampled: dict[Any, list[int]] = {}
    logprobs: dict[Any, list] = {}
    for j, (req, token) in enumerate(zip(s.sample_requests, result.token_ids)):
        sampled.setdefault(req.request_id, []).append(token)
        if result.logprobs is not None and result.logprobs[j] is not None:
            logprobs.setdefault(req.request_id, []).append(result.logprobs[j])
    for req in dict.fromkeys(s.sample_requests):
        tokens = sampled[req.request_id]
        if req.spec_token_ids:
            # Keep the accepted drafts plus the target's next token (spec_decode.py).
            # (the scheduler's update_from_output counts the accepted drafts)
            keep = num_accepted(req.spec_token_ids, tokens) + 1
            del tokens[keep:]
        if req.request_id in logprobs and not req.is_finished:
            if req.output_logprobs is None:
                req.output_logprobs = []
            req.output_logprobs.extend(logprobs[req.request_id][:len(tokens)])
    return sampled
