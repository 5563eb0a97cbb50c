"""A failure to read the input or write the output mid-run says which, in one line, exit 1
(both used to read "engine failed: ...", since the engine consumes the input lazily and the
results are written from inside its loop). Fake engine; failures injected."""

from __future__ import annotations

import errno

import pytest

from llmbatch import run_job
from llmbatch.jobs.errors import JobError


def _job(jobkit, tiny_tokenizer_dir, tmp_path, n=40):
    path = jobkit.write_prompts(str(tmp_path / "in.parquet"), n)
    return jobkit.make_job(tiny_tokenizer_dir, path, str(tmp_path / "out"),
                           input={"batch_size": 8}, output={"rows_per_part": 10})


@pytest.mark.parametrize("empty_prompts", [False, True])
def test_a_full_disk_is_a_write_failure(tmp_path, tiny_tokenizer_dir, fake_engine_env, jobkit,
                                        monkeypatch, empty_prompts):
    """Parts are committed from the runner's result loop, or (empty_prompts: every row is an
    error row made while the engine pulls the input) from inside that pull; the second part's
    write fails either way."""
    from llmbatch.jobs import committer

    real = committer.write_part
    calls = []

    def write_part(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(committer, "write_part", write_part)
    job = _job(jobkit, tiny_tokenizer_dir, tmp_path)
    if empty_prompts:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"prompt": [""] * 40}), job["input"]["path"])
    with pytest.raises(JobError) as info:
        run_job(job)
    assert info.value.exit_code == 1 and len(calls) == 2
    assert str(info.value) == ("writing the output failed: OSError: [Errno 28] No space left "
                               "on device")


def test_an_input_that_fails_mid_read_is_a_read_failure(tmp_path, tiny_tokenizer_dir,
                                                         fake_engine_env, jobkit, monkeypatch):
    from llmbatch.io.reader import ArrowDatasetSource   # a Parquet input's source

    real = ArrowDatasetSource.iter_batches
    batches = []

    def iter_batches(self, *args):
        it = real(self, *args)
        batches.append(next(it))
        yield batches[-1]
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(ArrowDatasetSource, "iter_batches", iter_batches)
    with pytest.raises(JobError) as info:
        run_job(_job(jobkit, tiny_tokenizer_dir, tmp_path))
    assert info.value.exit_code == 1
    assert str(info.value) == "reading the input failed: OSError: [Errno 5] Input/output error"
    assert len(batches) == 1
