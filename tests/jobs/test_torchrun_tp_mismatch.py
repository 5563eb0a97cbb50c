"""`torchrun --nproc_per_node 2 -m llmbatch.cli run job.yaml` with the job's
tensor_parallel_size left at 1: a README check found both ranks running the whole job on
their own, rank 1 refused by rank 0's shard lock and torchrun ending rank 0 (exit 1, a
ChildFailedError report). Now every rank refuses at once, naming the fix, and writes nothing."""

import pytest

from llmbatch import run_job
from llmbatch.jobs.errors import InvalidJobError


@pytest.mark.parametrize("rank", ["0", "1"])
def test_launched_ranks_with_tensor_parallel_size_1_are_refused(tmp_path, jobkit,
                                                                tiny_tokenizer_dir,
                                                                fake_engine_env, monkeypatch,
                                                                rank):
    for key, value in dict(RANK=rank, WORLD_SIZE="2", LOCAL_RANK=rank, MASTER_ADDR="127.0.0.1",
                           MASTER_PORT="29500").items():
        monkeypatch.setenv(key, value)
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 2)
    with pytest.raises(InvalidJobError) as info:
        run_job(jobkit.make_job(tiny_tokenizer_dir, inp, str(tmp_path / "out")))
    assert info.value.message == ("parallel.tensor_parallel_size: the launcher started 2 "
                                  "processes but tensor_parallel_size is 1; they must be equal")
    assert not (tmp_path / "out").exists()
