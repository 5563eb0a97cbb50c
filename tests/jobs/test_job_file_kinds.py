"""A job file that is a pipe is read (`llmbatch run <(envsubst < job.yaml)`: /dev/fd/63 is no
regular file, and it was 'job file not found: /dev/fd/63'); a directory is named as one, not as
missing (run_job('jobs/') said 'job file not found: jobs/')."""

import os
import threading

import pytest
import yaml

from llmbatch.api import InvalidJobError, load


def test_a_job_file_read_from_a_pipe(tmp_path, tiny_tokenizer_dir, jobkit):
    fifo = str(tmp_path / "job.fifo")
    os.mkfifo(fifo)
    text = yaml.safe_dump(jobkit.make_job(tiny_tokenizer_dir, "in.parquet", "out"))

    def write():
        with open(fifo, "w") as f:
            f.write(text)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        assert load(fifo).output.path == "out"
    finally:
        writer.join(timeout=10)


def test_a_directory_is_named_as_one(tmp_path):
    with pytest.raises(InvalidJobError) as info:
        load(str(tmp_path))
    assert info.value.message == f"job file {tmp_path} is a directory; name a YAML job file"


def test_a_missing_file_is_still_not_found(tmp_path):
    with pytest.raises(InvalidJobError) as info:
        load(str(tmp_path / "nope.yaml"))
    assert info.value.message == f"job file not found: {tmp_path / 'nope.yaml'}"
