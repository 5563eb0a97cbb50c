"""Run one shard of a job: read -> render -> engine -> reorder -> commit parts -> stats.

Exactly-once resume after a SIGKILL at any point rests on committer.py (in-order parts, file
renamed before its manifest entry) and on recovery at start: part files without a manifest
entry (and temporaries) are deleted and their rows produced again.
Memory stays bounded: input is read one batch at a time, and requests are generated lazily as
the engine pulls them.
"""

from __future__ import annotations

import os
from typing import Callable, Iterator, Optional

from llmbatch.io.column_values import columns_values
from llmbatch.io.input_digest import RowDigests, check_committed_inputs, check_input_rows
from llmbatch.io.manifest import Manifest
from llmbatch.io.prompts import PromptRenderer
from llmbatch.io.reader import InputSource, open_input, read_columns
from llmbatch.io.sharding import resolve_shard
from llmbatch.io.unique_ids import check_unique_ids
from llmbatch.io.writer import output_schema
from llmbatch.jobs.column_types import check_input_columns
from llmbatch.jobs.committer import InOrderCommitter
from llmbatch.jobs.engine_factory import make_engine, usable_engine
from llmbatch.jobs.engine_limits import (check_kv_pool, check_sampling,
                                         check_structured_outputs, engine_vocab_size,
                                         kept_prompt_tokens, row_error)
from llmbatch.jobs.errors import (InternalError, InvalidJobError, JobError, RowError,
                                  output_write_failed)
from llmbatch.jobs.gpu_monitor import GpuMonitor
from llmbatch.jobs.job_plan import JobPlan, JobResult
from llmbatch.jobs.path_checks import (check_input_output_overlap, check_local_path,
                                       check_output_dir, check_part_count)
from llmbatch.jobs.progress import Progress, stderr_line
from llmbatch.jobs.row_samples import DuplicateSample, RowSamples
from llmbatch.jobs.rows import fill_error, fill_from_result
from llmbatch.jobs.shard_lock import ShardLock, refuse_overwrite_of_running_shards
from llmbatch.jobs.config_hash import folder_spelling, settings_hash
from llmbatch.jobs.spec import JobSpec
from llmbatch.jobs.stats import ShardStats, next_run_index, write_stats


class JobRunner:
    def __init__(self, spec: JobSpec, engine_factory: Optional[Callable] = None,
                 progress: str = "none", log_every_s: float = 10.0) -> None:
        self.spec = spec
        self.engine_factory = engine_factory
        self.progress_mode = progress
        self.log_every_s = log_every_s
        self.out_dir = os.path.abspath(os.path.expanduser(spec.output.path))
        self.manifest = Manifest(self.out_dir)
        self._source: Optional[InputSource] = None

    # -- validation, no writes ---------------------------------------------------------------
    def plan(self, check_parts: bool = True) -> JobPlan:
        """check_parts: count only the rows of committed parts whose files are intact (reads
        every part's footer). A run passes False: Manifest.recover reads the footers under the
        shard lock, the check that must hold (the folder may change before the lock is taken),
        and on 100k parts on a network file system a second read of each doubles start-up."""
        spec = self.spec
        if "://" in spec.output.path:
            raise InvalidJobError(f"output.path {spec.output.path}: only local directories are "
                                  f"supported for output")
        if spec.input.path is not None:
            check_input_output_overlap(spec.input.path, spec.output.path)
        elif os.path.exists(os.path.expanduser(spec.input.dataset or "")):  # a local folder
            check_input_output_overlap(spec.input.dataset, spec.output.path, "input.dataset")
        check_output_dir(spec.output.path, self.out_dir)
        try:
            spec.engine_config()
            spec.sampling_params()
        except ValueError as exc:
            raise InvalidJobError(f"invalid engine/sampling settings: {exc}") from None
        check_local_path("model.path", spec.model.path)
        if spec.model.tokenizer:
            check_local_path("model.tokenizer", spec.model.tokenizer)
        if spec.model.lora:
            check_local_path("model.lora", spec.model.lora)
        if spec.speculative.method == "draft" and spec.speculative.draft_model:
            check_local_path("speculative.draft_model", spec.speculative.draft_model)
        shard = resolve_shard(spec.shard.index, spec.shard.count)
        self._source = open_input(spec.input, progress_bars=self.progress_mode != "none",
                                  per_row=spec.sampling.per_row)
        check_input_columns(self._source.schema, spec)   # before the model loads
        if spec.input.id_column:
            check_unique_ids(self._source, spec.input.id_column)
        num_rows = self._source.num_rows
        start, end = shard.row_range(num_rows)
        settings = spec.hashed_settings(shard.count)
        config_hash = settings_hash(settings)
        rows_done, intact = 0, []
        if spec.output.mode != "overwrite":
            self.manifest.refuse_parts_beyond(shard.count, spec.output.path)
        if spec.output.mode == "error" and self.manifest.has_results(shard.index):
            raise InvalidJobError(f"output.path {spec.output.path} already holds results of "
                                  f"shard {shard.index}; set output.mode: resume or overwrite")
        if spec.output.mode == "resume":
            every = self.manifest.entries()    # read once: every shard's, sorted by shard
            config_hash, settings = folder_spelling(every, config_hash, settings)
            self.manifest.check_hash(config_hash, settings, shard.index, shard.count, every)
            # The same input (its row count first), a manifest without gaps, and the input rows
            # of intact parts; damaged ones and those after them are redone (Manifest.recover).
            check_input_rows(every, num_rows, spec.output.path)
            entries = self.manifest.contiguous(every, shard.index, start)
            damaged = self.manifest.first_damaged(entries) if check_parts else None
            intact = entries[:damaged[0]] if damaged else entries
            rows_done = intact[-1]["row_end"] - start if intact else 0
            check_committed_inputs(self._source, read_columns(spec.input, spec.sampling.per_row),
                                   intact, spec.input.batch_size, spec.output.path)
        check_part_count(len(intact), end - start - rows_done, spec.output.rows_per_part)
        return JobPlan(shard, num_rows, start, end, rows_done, config_hash,
                       self._source.description, settings)

    def _say(self, message: str) -> None:
        # Before the bar exists (model loading can take minutes): plain lines on stderr.
        if self.progress_mode != "none":
            stderr_line(message)

    def _serve_if_worker_rank(self) -> None:
        """Rank > 0 of a TP job started by torchrun/srun: build the engine (it joins the group,
        serves rank 0's steps and ends this process) before anything reads or writes the
        output folder, which rank 0 alone owns (cleanup, manifest, parts, stats)."""
        tp = self.spec.parallel.tensor_parallel_size
        world = os.environ.get("WORLD_SIZE", "")
        if tp < 2 and not ("RANK" in os.environ and world.isdigit() and int(world) > 1):
            # (Under torchrun each rank would run the whole job and meet the others' lock.
            # srun's variables are not judged here: a batch script's one process sees them.)
            return
        from llmbatch.runtime.dist import detect_rendezvous

        try:
            rdv = detect_rendezvous(tp)
        except ValueError as exc:
            raise InvalidJobError(f"parallel.tensor_parallel_size: {exc}") from None
        if rdv.launched and rdv.rank > 0:
            make_engine(self.spec, self.engine_factory)
            raise InternalError(f"tensor-parallel rank {rdv.rank}: the engine returned on a "
                                f"worker rank")

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> JobResult:
        spec = self.spec
        self._serve_if_worker_rank()
        plan = self.plan(check_parts=False)     # rows_done: as the manifest says, unchecked
        self._say(f"llmbatch: shard {plan.shard.index}/{plan.shard.count}: rows "
                  f"[{plan.row_start}, {plan.row_end}) of {plan.num_input_rows} from "
                  f"{plan.input_description}; {plan.rows_done} already done; "
                  f"config hash {plan.config_hash}")
        # From here on we write. One run per shard: a second one would delete this one's
        # in-flight files as leftovers. The lock comes before the model load, so a duplicate
        # run (a requeued SLURM task racing the original) refuses at once, not after minutes
        # of loading. overwrite clears only after everything validated (_run_locked).
        lock = ShardLock.claim(self.out_dir, plan.shard.index, spec.output.path)
        engine = None
        try:
            try:
                if spec.output.mode == "overwrite":   # before minutes of model loading
                    refuse_overwrite_of_running_shards(self.out_dir, spec.output.path, plan.shard)
                self._say(f"llmbatch: loading model {spec.model.path}")
                engine = usable_engine(make_engine(spec, self.engine_factory))
                renderer = PromptRenderer(engine.tokenizer, spec.model, spec.input)
                self._max_model_len = int(engine.max_model_len)
                self._vocab_size = engine_vocab_size(engine)
                check_sampling(spec.sampling, self._max_model_len, self._vocab_size)
                check_kv_pool(engine, self._max_model_len, spec.engine.kv_cache_blocks)
                check_structured_outputs(engine, spec.sampling)
            except BaseException:
                # Only the lock file (and the folders made for it) are ours so far: a job
                # whose model cannot be loaded leaves output.path as it found it, like any
                # other invalid job.
                lock.discard()
                raise
            return self._run_locked(plan, engine, renderer)
        finally:
            # A TP engine's workers and process group end with the job: a pipeline's second
            # run_job in this process would otherwise find the group taken (custom engines
            # may have no shutdown).
            stop = getattr(engine, "shutdown", None)
            if callable(stop):
                stop()
            lock.release()

    def _run_locked(self, plan: JobPlan, engine, renderer: PromptRenderer) -> JobResult:
        spec = self.spec
        shard = plan.shard
        if spec.output.mode == "overwrite":
            # Again: one may have started while the model loaded.
            refuse_overwrite_of_running_shards(self.out_dir, spec.output.path, shard)
            self.manifest.clear(shard.index, all_shards=shard.count == 1,
                                shard_count=shard.count)
        self._shard, self._plan = shard, plan
        # The rows handed to the engine, until all sampling.n samples of each are back.
        self._samples = RowSamples(spec.sampling.n)
        # The optional output columns this job writes (sample_index, logprobs, prompt_logprobs):
        # one list for the schema and for filling the rows.
        self._extra_output = spec.extra_output_columns
        schema = output_schema(self._source.schema, spec.input.keep_columns,
                               spec.input.id_column, self._extra_output)
        committed = self.manifest.recover(shard.index, plan.row_start)
        if self.manifest.dropped:     # data was damaged or lost: say so whatever the progress mode
            stderr_line(f"llmbatch: output.path {spec.output.path}: {self.manifest.dropped}")
        self._committer = InOrderCommitter(
            self.out_dir, self.manifest, committed, plan.row_start, plan.row_end,
            spec.output.rows_per_part, schema, shard_index=shard.index,
            digests=RowDigests(read_columns(spec.input, spec.sampling.per_row)),
            part_meta=lambda: {"shard": shard.index, "shard_count": shard.count,
                               "num_input_rows": plan.num_input_rows,
                               "config_hash": plan.config_hash, "model": spec.model.path,
                               "settings": plan.settings})
        resume_row = self._committer.resume_row
        self.stats = ShardStats()
        self._progress = Progress(self.progress_mode, plan.row_end - plan.row_start,
                                  initial=resume_row - plan.row_start,
                                  log_every_s=self.log_every_s)
        try:
            with GpuMonitor() as gpu:
                requests = self._requests(renderer, resume_row, plan.row_end)
                try:
                    for result in engine.generate(requests):
                        self._on_result(result)
                except JobError:
                    raise
                except Exception as exc:
                    raise InternalError(f"engine failed: {type(exc).__name__}: {exc}") from exc
                self._committer.commit_ready()
                if not self._committer.done:
                    raise InternalError(f"engine returned results for rows up to "
                                        f"{self._committer.next_commit}, expected "
                                        f"{plan.row_end}")
            gpu_summary = gpu.summary()
        finally:
            self._progress.close()
        engine_stats = dict(engine.stats()) if hasattr(engine, "stats") else {}
        result = self._result(gpu_summary, resume_row, engine_stats)
        result.extra["engine_stats"] = engine_stats
        self._say(f"llmbatch: done in {result.stats['wall_s']:.1f}s; stats in {result.stats_path}")
        return result

    def _input_batches(self, start: int, end: int, columns: list, batch_size: int) -> Iterator:
        """The source's batches; a read failure (the file changed, a network file system
        dropped) names the input, not the engine that consumes these lazily."""
        import pyarrow as pa

        batches = self._source.iter_batches(start, end, columns, batch_size)
        while True:
            try:
                item = next(batches)
            except StopIteration:
                return
            except (OSError, pa.ArrowException) as exc:
                raise InternalError(f"reading the input failed: {type(exc).__name__}: {exc}") \
                    from exc
            yield item

    def _requests(self, renderer: PromptRenderer, start: int, end: int) -> Iterator:
        """Lazily: input batches -> Requests; bad rows become error rows on the spot."""
        from llmbatch.runtime.request import Request

        spec, inp = self.spec, self.spec.input
        per_row = spec.sampling.per_row
        # The columns a row takes values from; the prompt (messages) column is decoded once,
        # by the renderer, unless a row also keeps it.
        row_columns = list(dict.fromkeys(inp.keep_columns + per_row
                                         + ([inp.id_column] if inp.id_column else [])))
        columns = read_columns(inp, per_row)
        keep = kept_prompt_tokens(spec.sampling, self._max_model_len)
        for first, batch in self._input_batches(start, end, columns, inp.batch_size):
            self._committer.digests.add(first, batch)
            rendered = renderer.render(batch)   # its errors include a prompt that is not UTF-8
            data, not_utf8 = columns_values(batch, row_columns)   # text not UTF-8: row errors
            for i, (token_ids, error) in enumerate(rendered):
                error = error or not_utf8.get(i)
                row_index = first + i
                row = {c: data[c][i] for c in inp.keep_columns}
                row["id"] = data[inp.id_column][i] if inp.id_column else row_index
                params = None
                if token_ids and keep is not None and len(token_ids) > keep:
                    token_ids = token_ids[-keep:]     # left truncation, as vLLM's
                if error is None and row["id"] is None:
                    error = f"input.id_column {inp.id_column!r} is null (the row cannot be joined)"
                if error is None:
                    try:
                        params = spec.sampling_params({k: data[k][i] for k in per_row},
                                                      row_seed_offset=row_index)
                    except (ValueError, TypeError) as exc:
                        error = f"invalid per-row sampling value: {exc}"
                if error is None:
                    error = row_error(len(token_ids), params, self._max_model_len,
                                      self._vocab_size)
                if error is not None:
                    self._record_error(row_index, row, error, token_ids)
                    continue
                yield from self._samples.requests(row_index, row, token_ids, params, Request)
            self._committer.commit_ready()

    def _record_error(self, row_index: int, row: dict, error: str,
                      token_ids: Optional[list[int]]) -> None:
        if self.spec.on_row_error == "fail":
            raise RowError(f"row {row['id']!r}: {error} (on_row_error: fail)")
        self._finish_row(row_index, self._samples.expand(fill_error(row, error, token_ids)))

    def _on_result(self, result) -> None:
        row = self._samples.row_of(result.request_id)
        if row is None:
            raise InternalError(f"engine returned an unknown request id {result.request_id!r}")
        if result.finish_reason == "error" and self.spec.on_row_error == "fail":
            raise RowError(f"row {row['id']!r}: {result.error} (on_row_error: fail)")
        try:
            done = self._samples.add_result(
                result.request_id, lambda r: fill_from_result(r, result, self._extra_output))
        except DuplicateSample:
            raise InternalError(f"engine returned request id {result.request_id!r} "
                                f"twice") from None
        if done is not None:
            self._finish_row(*done)
        self._committer.commit_ready()   # a write failure is its own one line (committer.py)

    def _finish_row(self, row_index: int, rows: list[dict]) -> None:
        """rows: the input row's sampling.n output rows, in sample order."""
        self._committer.finish(row_index, rows)
        self.stats.add_samples(rows)
        self._progress.update(1, self.stats.output_tok_s, self.stats.prefix_hit_rate)

    def _result(self, gpu_summary: dict, resume_row: int, engine_stats: dict) -> JobResult:
        plan, shard = self._plan, self._shard
        summary = self.stats.summary(
            shard_index=shard.index, shard_count=shard.count,
            run=next_run_index(self.out_dir, shard.index),
            rows_total=plan.row_end - plan.row_start, rows_skipped=resume_row - plan.row_start,
            config_hash=plan.config_hash, seed=self.spec.sampling.seed, gpu=gpu_summary,
            engine=engine_stats)
        try:
            stats_path = write_stats(self.out_dir, summary)
        except OSError as exc:
            raise output_write_failed(exc) from exc
        num_errors = self._committer.num_errors
        total = plan.row_end - plan.row_start
        return JobResult(
            output_path=self.out_dir,
            part_paths=self._committer.part_paths,
            stats_path=stats_path, stats=summary, num_rows=total,
            num_rows_ok=total - num_errors, num_rows_error=num_errors,
            num_rows_skipped=resume_row - plan.row_start, config_hash=plan.config_hash,
            shard_index=shard.index, shard_count=shard.count)


def run_spec(spec: JobSpec, engine_factory: Optional[Callable] = None, progress: str = "none",
             log_every_s: float = 10.0) -> JobResult:
    return JobRunner(spec, engine_factory, progress, log_every_s).run()
