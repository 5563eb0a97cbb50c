"""Engine: the step loop. schedule -> model runner -> sample -> append, stop checks -> results.

`generate` streams: requests are pulled through the Planner only as the waiting queue drains,
so an input of millions of rows never sits in memory, and results are yielded as soon as each
request finishes (in any order; the job layer restores input order).
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Iterable, Iterator, Optional

from llmbatch.runtime.block_manager import BlockManager
from llmbatch.runtime.config import EngineConfig
from llmbatch.runtime.engine_speculation import SpeculationMixin, make_proposer
from llmbatch.runtime.engine_stats import runner_stats
from llmbatch.runtime.outputs import GenerationResult, result_of
from llmbatch.runtime.planner import Planner
from llmbatch.runtime.request import FinishReason, Request, RequestStatus
from llmbatch.runtime.request_checks import why_never_runs
from llmbatch.runtime.scheduler import Scheduler
from llmbatch.runtime.seeded_uniforms import default_seed
from llmbatch.runtime.stop_checker import StopChecker
from llmbatch.runtime.stop_rules import apply_stop_rules, fold_stop_rules, output_text
from llmbatch.runtime.structured_outputs import load_structured_outputs
from llmbatch.runtime.token_rules import BadWordsCache

logger = logging.getLogger(__name__)


class Engine(SpeculationMixin):
    def __init__(self, config: EngineConfig, runner=None, tokenizer=None) -> None:
        from transformers import AutoTokenizer

        from llmbatch.runtime.tp_executor import make_model_runner

        self.config = config
        self.runner = runner if runner is not None else make_model_runner(config)
        self.tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(
            config.tokenizer or self.runner.model_path,
            trust_remote_code=config.trust_remote_code)
        self.max_model_len = self.runner.max_model_len
        self.proposer = make_proposer(config, self.runner, self.max_model_len)
        self.eos_token_ids = self._find_eos_token_ids()
        self.vocab_size = self.runner.hf_config.vocab_size
        self._live_ids: set = set()      # ids of admitted, unfinished requests
        # Those of them whose rows read the host's token history (SamplingParams.needs_history:
        # penalties, bad words, a grammar): while one of them is running (a token of it may be
        # in flight) steps run synchronously. Waiting ones cost nothing: admission runs far
        # ahead of scheduling.
        self._history_ids: set = set()
        # Structured outputs' grammar compiler, built by the first structured request (None
        # until then; _structured_error says why it could not be built).
        self._structured = None
        self._structured_error: Optional[str] = None
        self._bad_words = BadWordsCache(self.tokenizer)   # bad_words -> token sequences
        self.block_manager = BlockManager(
            self.runner.num_kv_blocks, config.block_size, config.prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager, max_model_len=self.max_model_len)
        self.planner = Planner(config.ordering, config.planner_window, config.block_size)
        # Async scheduling: the step launched but not yet collected, with its schedule.
        can_launch = hasattr(self.runner, "launch")
        # With a proposer, an async engine still runs its speculative steps (small batches)
        # synchronously: see Engine.step and SpeculationMixin._speculates_next_step.
        self.async_scheduling = config.async_scheduling_on(
            getattr(getattr(self.runner, "device", None), "type", "cpu"), can_launch)
        if self.async_scheduling and not can_launch:
            raise ValueError(f"async_scheduling needs a model runner with launch(); "
                             f"{type(self.runner).__name__} has none")
        self._in_flight = None   # (SchedulerOutput, LaunchedStep) or None
        self._arrivals = itertools.count()
        self._counters = dict(num_requests=0, num_error_requests=0, num_prompt_tokens=0,
                              num_cached_prompt_tokens=0, num_output_tokens=0, num_steps=0,
                              num_preemptions=0, num_spec_accepted_tokens=0,
                              # Async scheduling: tokens computed past a stop, then dropped.
                              num_async_dropped_tokens=0,
                              # Host wall time per step phase (bench/ reads the split): the
                              # scheduler with proposals, the runner (input prep, forward and
                              # sampling, which waits for the GPU), and stop checks + results.
                              schedule_s=0.0, execute_s=0.0, postprocess_s=0.0)

    def _find_eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        gen_eos = None
        try:
            from transformers import GenerationConfig

            gen_eos = GenerationConfig.from_pretrained(self.runner.model_path).eos_token_id
        except Exception:  # no generation_config.json: fall back to model config / tokenizer
            gen_eos = getattr(self.runner.hf_config, "eos_token_id", None)
        for source in (gen_eos, self.tokenizer.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(int(x) for x in source)
        return ids

    # -- public API -------------------------------------------------------------------
    def generate(self, requests: Iterable[Request]) -> Iterator[GenerationResult]:
        """Run `requests` to completion, yielding one GenerationResult per request.

        Requests are checked as they leave the planner: one that can never run is yielded at
        once as an error result, so a long run of bad rows streams out instead of piling up.
        """
        planned = self.planner.plan(self._with_default_seeds(requests))
        exhausted = False
        # Keep enough requests waiting that every step can fill its batch.
        refill_to = max(2 * self.config.max_num_seqs, 64)
        while True:
            while not exhausted and self.scheduler.num_waiting < refill_to:
                req = next(planned, None)
                if req is None:
                    exhausted = True
                    break
                rejected = self._admit(req)
                if rejected is not None:
                    yield rejected
            if not self.scheduler.has_unfinished_requests() and self._in_flight is None:
                if exhausted:
                    return
                continue
            yield from self.step()

    def step(self) -> list[GenerationResult]:
        if self.async_scheduling:
            if not self._speculates_next_step() and not self._history_rows_running():
                return self._step_async()
            if self._in_flight is not None:
                # The next step drafts (the proposer reads every token so far and verification
                # runs synchronously) or samples a row that reads the host's token history
                # (penalties, bad words, a grammar), so the step in flight is collected first
                # (no overlap for this one step; drafting: at most a few such switches a job,
                # as the batch shrinks).
                in_flight, self._in_flight = self._in_flight, None
                return self._collect(*in_flight)
            try:
                return self._step_sync()
            finally:
                # Drafts left unverified (no budget for their request, or the step raised)
                # must not reach an async step; the next sync step proposes afresh anyway.
                self.scheduler.drop_all_drafts()
        return self._step_sync()

    def _history_rows_running(self) -> bool:
        """A running request's rows read its token history (SamplingParams.needs_history):
        its next row needs every token so far."""
        return bool(self._history_ids) and any(
            r.sampling_params.needs_history for r in self.scheduler.running)

    def _step_sync(self) -> list[GenerationResult]:
        """One synchronous step: propose drafts, schedule, run, append, stop checks."""
        t0 = time.perf_counter()
        if self.proposer is not None:
            self._propose()
        out = self.scheduler.schedule()
        if hasattr(self.proposer, "fill"):
            self.proposer.fill([item.request for item in out.scheduled])
        self._counters["num_preemptions"] += len(out.preempted)
        if not out.scheduled:
            if out.preempted:
                return []
            raise RuntimeError("scheduler made no progress: KV pool too small for one request")
        t1 = time.perf_counter()
        sampled = self.runner.execute(out)
        t2 = time.perf_counter()
        self.scheduler.update_from_output(out, sampled)
        self._counters["num_steps"] += 1
        finished = self._finish_stopped(out, sampled)
        t3 = time.perf_counter()
        self._counters["schedule_s"] += t1 - t0
        self._counters["execute_s"] += t2 - t1
        self._counters["postprocess_s"] += t3 - t2
        return finished

    def _step_async(self) -> list[GenerationResult]:
        """One step of async scheduling (docs/async_scheduling.md): schedule and launch step
        n+1 while step n is on the device, then collect step n's tokens and run its stop
        checks. Step n+1 was planned as if every sampling request of step n went on; one that
        stopped at step n has its step n+1 token dropped. When the pool might have to preempt
        a request with a token in flight, step n is collected first (no overlap this time)."""
        t0 = time.perf_counter()
        in_flight = self._in_flight
        out = None
        if in_flight is None or self.scheduler.fits_without_preemption():
            out = self.scheduler.schedule()
            self._counters["num_preemptions"] += len(out.preempted)
            if not out.scheduled and in_flight is None and not out.preempted:
                raise RuntimeError("scheduler made no progress: KV pool too small for one request")
        t1 = time.perf_counter()
        # Step n stays in _in_flight until step n+1 is launched: a launch that raises leaves
        # it collectable (as the sync path leaves its state), never orphans its pending tokens.
        if out is not None and out.scheduled:
            launched = self.runner.launch(out, in_flight[1] if in_flight is not None else None)
            self.scheduler.commit_launched(out)
            self._in_flight = (out, launched)
        else:
            self._in_flight = None
        t2 = time.perf_counter()
        self._counters["schedule_s"] += t1 - t0
        self._counters["execute_s"] += t2 - t1
        if in_flight is None:
            return []
        return self._collect(*in_flight)

    def _collect(self, out, launched) -> list[GenerationResult]:
        """Async: wait for a launched step's tokens, put them in place of its pending tokens,
        run its stop checks; the results of the requests that ended."""
        t0 = time.perf_counter()
        sampled = launched.result()   # waits for that step (and only it)
        t1 = time.perf_counter()
        self._counters["num_async_dropped_tokens"] += self.scheduler.apply_sampled(out, sampled)
        self._counters["num_steps"] += 1
        finished = self._finish_stopped(out, sampled)
        self._counters["execute_s"] += t1 - t0
        self._counters["postprocess_s"] += time.perf_counter() - t1
        return finished

    def _finish_stopped(self, out, sampled) -> list[GenerationResult]:
        """Stop checks for the requests that received tokens; results of those that ended."""
        finished = []
        now = time.perf_counter()
        finished_status = RequestStatus.FINISHED
        for item in out.scheduled:
            req = item.request
            if req.status is finished_status or req.request_id not in sampled:
                continue
            ids = req.output_token_ids
            n_out = len(ids)
            if (n_out == req.num_stop_checked + 1 and n_out < req.max_output_tokens
                    and ids[-1] not in req.stop_token_set and not req.stop_checker.active):
                # Fast path (most requests, every step): one new token that is no stop token,
                # below the length limits, no stop strings: apply_stop_rules would find nothing
                # (stop_rules.fold_stop_rules folds its token and length rules at admission).
                req.num_stop_checked = n_out
                continue
            reason = apply_stop_rules(req, self.eos_token_ids, self.max_model_len)
            if reason is not None:
                self.scheduler.finish_request(req, reason)
                self._live_ids.discard(req.request_id)
                self._history_ids.discard(req.request_id)
                req.finish_time = now
                finished.append(self._result(req))
        return finished

    def shutdown(self) -> None:
        """Release what would outlive the engine: a tensor-parallel runner's worker processes
        and process group (one group per process: a second TP engine needs this one's gone).
        Idempotent; a single-process runner holds nothing to release."""
        stop = getattr(self.runner, "shutdown", None)
        if callable(stop):
            stop()

    def reset_prefix_cache(self) -> None:
        """Drop cached KV blocks that no running request holds."""
        self.block_manager.reset_prefix_cache()

    def stats(self) -> dict:
        s = dict(self._counters)
        s["prefix_hit_rate"] = (s["num_cached_prompt_tokens"] / s["num_prompt_tokens"]
                                if s["num_prompt_tokens"] else 0.0)
        s.update(runner_stats(self.runner, self.config))
        s["async_scheduling"] = self.async_scheduling
        return s

    # -- helpers ----------------------------------------------------------------------
    def _with_default_seeds(self, requests: Iterable[Request]) -> Iterator[Request]:
        """Seeds for requests without one follow input order, before any reordering, so
        they do not depend on the planner's window or ordering."""
        for req in requests:
            if req.default_seed is None:
                req.default_seed = default_seed(self.config.seed, next(self._arrivals))
            yield req

    def structured_outputs_error(self, spec: dict) -> Optional[str]:
        """Why requests with structured_outputs `spec` (check_spec-valid) cannot run on this
        engine (xgrammar missing, a schema / regex / grammar that does not compile), or None.
        The job runner asks before any row runs when the spec is job-wide: every row would
        fail alike. The compiled grammar is cached for the requests."""
        return self._grammar_matcher(spec)[1]

    def _grammar_matcher(self, spec: dict):
        """(a fresh grammar matcher for `spec`, None) or (None, the reason there is none).
        The compiler is built on first use (runtime/structured_outputs.py)."""
        if self._structured is None:
            self._structured, self._structured_error = load_structured_outputs(
                self.tokenizer, self.vocab_size, self.eos_token_ids)
        if self._structured is None:
            return None, self._structured_error
        try:
            return self._structured.matcher(spec), None
        except ValueError as exc:
            return None, str(exc)

    def _attach_grammar(self, req: Request) -> Optional[str]:
        """Give a structured request its grammar matcher; the reason it cannot have one, or
        None."""
        req.grammar, error = self._grammar_matcher(req.sampling_params.structured_outputs)
        if error is None:
            req.num_grammar_tokens = 0
        return error

    def _admit(self, req: Request) -> Optional[GenerationResult]:
        """Queue the request, or return its error result when it can never run."""
        self._counters["num_requests"] += 1
        error = why_never_runs(self, req)
        if error is None and req.sampling_params.structured_outputs is not None:
            error = self._attach_grammar(req)
        if error is None and req.sampling_params.bad_words:
            if self.tokenizer is None:
                error = "bad_words needs the model's tokenizer"
            else:
                req.bad_words_ids = self._bad_words(req.sampling_params.bad_words)
        if error is not None:
            self._counters["num_error_requests"] += 1
            req.status = RequestStatus.FINISHED
            req.finish_reason = FinishReason.ERROR
            req.finish_time = time.perf_counter()
            return self._result(req, error=error)
        req.stop_checker = StopChecker(self.tokenizer, req.sampling_params)
        fold_stop_rules(req, self.eos_token_ids, self.max_model_len)
        req.arrival_time = time.perf_counter()
        self._live_ids.add(req.request_id)
        if req.sampling_params.needs_history:
            self._history_ids.add(req.request_id)
        self.scheduler.add_request(req)
        return None

    def _result(self, req: Request, error: Optional[str] = None) -> GenerationResult:
        c = self._counters
        n_out = req.num_output_tokens
        if error is None:
            c["num_prompt_tokens"] += req.num_prompt_tokens
            c["num_cached_prompt_tokens"] += req.num_cached_tokens or 0
            c["num_output_tokens"] += n_out
            c["num_spec_accepted_tokens"] += req.num_spec_accepted_tokens
        return result_of(req, output_text(req, self.tokenizer), error)
