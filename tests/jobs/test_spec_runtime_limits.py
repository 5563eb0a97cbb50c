"""Job values that pass a plain type check but that the run cannot take are refused when the job
loads (InvalidJobError, exit 2), not discovered after the model loaded or the shard ran."""

import pyarrow.parquet as pq
import pytest

from llmbatch import run_job
from llmbatch.jobs.errors import InvalidJobError
from llmbatch.jobs.loader import load_job
from llmbatch.jobs.stats import read_stats


def job(**sections):
    data = {"model": {"path": "m"}, "input": {"path": "in.parquet"}, "output": {"path": "out"}}
    data.update(sections)
    return data


def test_seed_beyond_int64_is_refused_at_load():
    with pytest.raises(InvalidJobError) as info:
        load_job(job(sampling={"seed": 2**63}))
    assert info.value.message == ("sampling.seed: must be less than or equal to "
                                  "9223372036854775807 (got 9223372036854775808)")
    with pytest.raises(InvalidJobError, match=r"^sampling\.seed: must be greater than or equal"):
        load_job(job(sampling={"seed": -(2**63) - 1}))


def test_int64_extreme_seeds_load():
    assert load_job(job(sampling={"seed": 2**63 - 1})).sampling.seed == 2**63 - 1
    assert load_job(job(sampling={"seed": -(2**63)})).sampling.seed == -(2**63)


def test_largest_seed_runs_and_writes_its_stats(tmp_path, tiny_tokenizer_dir, jobkit,
                                                fake_engine_env):
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 5)
    out = str(tmp_path / "out")
    result = run_job(jobkit.make_job(tiny_tokenizer_dir, inp, out,
                                     sampling={"seed": 2**63 - 1}))
    assert result.exit_code == 0
    assert read_stats(out).column("seed").to_pylist() == [2**63 - 1]
    assert sum(pq.read_table(p).num_rows for p in result.part_paths) == 5


@pytest.mark.parametrize("device", ["tpu9", "CPU", "cuda:", "cuda:x", "gpu", ""])
def test_unknown_device_is_refused_at_load(device):
    with pytest.raises(InvalidJobError) as info:
        load_job(job(engine={"device": device}))
    assert info.value.message == f"engine.device: must be auto, cpu, cuda or cuda:N (got {device!r})"


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_known_devices_load(device):
    assert load_job(job(engine={"device": device})).engine.device == device


@pytest.mark.parametrize("value", [-3, 0])
def test_max_model_len_below_one_is_refused_at_load(value):
    # 0 used to mean "the model's default" silently, -3 made every row an error (exit 3).
    with pytest.raises(InvalidJobError) as info:
        load_job(job(engine={"max_model_len": value}))
    assert info.value.message == (f"engine.max_model_len: must be greater than or equal to 1 "
                                  f"(got {value})")


def test_max_model_len_beyond_the_model_is_refused_before_writing(tmp_path, tiny_llama_dir,
                                                                   jobkit, monkeypatch):
    # Used to be clamped to the model's 256 silently; vLLM refuses it too.
    monkeypatch.delenv("LLMBATCH_ENGINE_FACTORY", raising=False)
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 3)
    out = tmp_path / "out"
    with pytest.raises(InvalidJobError) as info:
        run_job(jobkit.make_job(tiny_llama_dir, inp, str(out),
                                engine={"max_model_len": 100000, "device": "cpu"}))
    assert info.value.message == (f"invalid engine settings: max_model_len=100000 is larger "
                                  f"than the max_position_embeddings (256) of model "
                                  f"{tiny_llama_dir}")
    assert info.value.exit_code == 2
    assert not out.exists()


def test_triton_backend_on_cpu_is_refused_before_writing(tmp_path, tiny_llama_dir, jobkit,
                                                        monkeypatch):
    # Used to fail at the first forward: exit 1, output folder created.
    monkeypatch.delenv("LLMBATCH_ENGINE_FACTORY", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 3)
    out = tmp_path / "out"
    with pytest.raises(InvalidJobError) as info:
        run_job(jobkit.make_job(tiny_llama_dir, inp, str(out),
                                engine={"attention_backend": "triton", "device": "cpu"}))
    assert info.value.message == ("invalid engine settings: attention_backend='triton' needs a "
                                  "CUDA device, the engine runs on cpu; use auto or torch")
    assert not out.exists()
