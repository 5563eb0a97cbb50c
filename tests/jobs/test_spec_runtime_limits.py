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


def test_negative_max_model_len_is_refused_at_load():
    # -3 made every row an error (exit 3).
    with pytest.raises(InvalidJobError) as info:
        load_job(job(engine={"max_model_len": -3}))
    assert info.value.message == "engine.max_model_len: must be greater than or equal to 0 (got -3)"


@pytest.mark.parametrize("value, config_hash", [(0, "6b770b5ca820cead"),
                                                (4096, "b98526f39987741b")])
def test_max_model_len_0_or_beyond_the_model_keeps_its_hash(value, config_hash):
    # Pinned under output rules v4 (config_hash.OUTPUT_RULES_VERSION; under v3 they were
    # 238582cf81a7574c and ca31e2afb0689b46, under v2 8857cd09d2b655e9 and 088f6b50e8ea485a): folders written with these values must resume. 0 is the model's own length, like null (it was until e2a439a). As
    # 4b0690d computed them (rules v1) they were eaaa636720c098d2 and 65dbe9f427fec5ac; v1
    # folders now refuse with the rules-version line (test_config_hash_refusal.py).
    spec = load_job(job(engine={"max_model_len": value}))
    assert spec.config_hash(1) == config_hash
    assert spec.engine_config().max_model_len == (None if value == 0 else value)


def test_max_model_len_beyond_the_model_warns_and_resumes(tmp_path, tiny_llama_dir, jobkit,
                                                          monkeypatch, capsys):
    # e2a439a refused it (exit 2), so a folder written with it could not be resumed.
    import yaml

    from llmbatch.cli import main

    monkeypatch.delenv("LLMBATCH_ENGINE_FACTORY", raising=False)
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 3)
    out = tmp_path / "out"
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(jobkit.make_job(
        tiny_llama_dir, inp, str(out), engine={"max_model_len": 4096, "device": "cpu"})))
    warning = (f"llmbatch: warning: max_model_len 4096 is larger than the "
               f"max_position_embeddings (256) of model {tiny_llama_dir}; using 256")
    assert main(["run", str(path), "--progress", "none"]) == 0
    assert capsys.readouterr().err.splitlines() == [warning]
    assert len(pq.read_table(out).to_pylist()) == 3
    first = sorted(p.name for p in out.iterdir())
    assert main(["run", str(path), "--progress", "none"]) == 0     # resumes: nothing to do
    assert capsys.readouterr().err.splitlines() == [warning]
    assert sorted(p.name for p in out.iterdir()) == first
    # In-process, a root handler (logging.basicConfig, pytest's) does not print it a second
    # time, and the CLI leaves the llmbatch logger as it found it (found in review).
    import logging

    log = logging.getLogger("llmbatch")
    before = (list(log.handlers), log.propagate)
    seen = []

    class Root(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    root = Root()
    logging.getLogger().addHandler(root)
    try:
        assert main(["run", str(path), "--progress", "none"]) == 0
        assert capsys.readouterr().err.splitlines() == [warning] and seen == []
        assert (list(log.handlers), log.propagate) == before
    finally:
        logging.getLogger().removeHandler(root)


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


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_a_setting_error(tmp_path, tiny_llama_dir, jobkit,
                                                     monkeypatch):
    # Was 'model.path ...: cannot load the model: device 'cuda' requested ...': the model is
    # fine, the setting is what this machine cannot honour.
    monkeypatch.delenv("LLMBATCH_ENGINE_FACTORY", raising=False)
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 3)
    out = tmp_path / "out"
    with pytest.raises(InvalidJobError) as info:
        run_job(jobkit.make_job(tiny_llama_dir, inp, str(out), engine={"device": "cuda"}))
    assert (info.value.message, info.value.exit_code) == (
        "invalid engine settings: device 'cuda' requested but CUDA is not available", 2)
    assert not out.exists()
