"""A KV pool that cannot hold one sequence of the engine's max_model_len is a job error at
start (InvalidJobError, exit 2, nothing written), as vLLM refuses to start with "The model's
max seq len (X) is larger than the maximum number of tokens that can be stored in KV cache".

It used to make every row that could grow past the pool an error row ("the sequence can reach
86 tokens ...; the KV pool holds 32"), committed like any row. The pool size is not in the
config hash (a performance knob), so a resume after raising engine.kv_cache_blocks skipped
those rows: they were lost unless the user overwrote everything."""

import os
import types

import pyarrow.dataset as ds
import pytest
import yaml

from llmbatch import run_job
from llmbatch.cli import main
from llmbatch.jobs.engine_limits import check_kv_pool
from llmbatch.jobs.errors import InvalidJobError

# tiny_llama_dir: max_position_embeddings 256, so 16 blocks of 16 tokens hold one sequence.
REFUSED_2_BLOCKS = (
    "KV cache too small: the pool holds 32 tokens (2 blocks of 16), fewer than one sequence of "
    "max_model_len 256 tokens, so longer rows could never run; raise engine.kv_cache_blocks "
    "to 16 or more (or set it to null to size the pool from engine.gpu_memory_utilization), "
    "or lower engine.max_model_len to 32 or less")


@pytest.fixture
def real_job(tmp_path, tiny_llama_dir, jobkit, monkeypatch):
    """job(**engine) -> a 5-row job dict on the runtime engine (tiny Llama, CPU)."""
    monkeypatch.delenv("LLMBATCH_ENGINE_FACTORY", raising=False)
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 5)

    def job(speculative=None, parallel=None, **engine):
        return jobkit.make_job(tiny_llama_dir, inp, str(tmp_path / "out"),
                               sampling={"max_new_tokens": 64},
                               engine={"device": "cpu", "block_size": 16, **engine},
                               speculative=speculative or {"method": "none"},
                               parallel=parallel or {"tensor_parallel_size": 1})
    return job


# A draft model's KV pool has as many blocks as the target's (draft_proposer.py), and a
# tensor-parallel engine's pool is the smallest rank's: the one check covers both, and the
# refused engine (its draft runner, its worker ranks) is shut down with the job.
@pytest.mark.parametrize("extra", [
    {},
    {"speculative": {"method": "draft", "num_tokens": 2}},
    {"parallel": {"tensor_parallel_size": 2}},
], ids=["plain", "draft_model", "tp2"])
def test_pool_below_max_model_len_refuses_then_a_larger_pool_runs_every_row(
        tmp_path, tiny_llama_dir, real_job, extra):
    if "speculative" in extra:
        extra = {"speculative": dict(extra["speculative"], draft_model=tiny_llama_dir)}
    with pytest.raises(InvalidJobError) as info:
        run_job(real_job(kv_cache_blocks=2, **extra))
    assert (info.value.exit_code, info.value.message) == (2, REFUSED_2_BLOCKS)
    assert not (tmp_path / "out").exists()
    # The user's fix (a pool of exactly one max_model_len sequence) runs every row: none was
    # committed as an error row that a resume would skip.
    result = run_job(real_job(kv_cache_blocks=16, **extra))
    assert (result.exit_code, result.num_rows_ok, result.num_rows_skipped) == (0, 5, 0)
    assert [r["error"] for r in ds.dataset(str(tmp_path / "out")).to_table().to_pylist()] == \
        [None] * 5


def test_lowering_max_model_len_runs_on_the_small_pool(tmp_path, real_job):
    # The third fix: the context the pool can hold. Rows stop there ("length").
    result = run_job(real_job(kv_cache_blocks=2, max_model_len=32))
    assert (result.exit_code, result.num_rows_ok) == (0, 5)
    rows = ds.dataset(str(tmp_path / "out")).to_table().to_pylist()
    assert [(r["finish_reason"], r["num_prompt_tokens"] + r["num_output_tokens"])
            for r in rows] == [("length", 32)] * 5


def test_cli_refusal_is_one_line_exit_2(tmp_path, tiny_tokenizer_dir, jobkit, fake_engine_env,
                                        capsys):
    # The fake engine has max_model_len 512 (no config.json) and a pool of kv_cache_blocks.
    jobkit.write_prompts(str(tmp_path / "in.parquet"), 3)
    job = jobkit.make_job(tiny_tokenizer_dir, str(tmp_path / "in.parquet"),
                          str(tmp_path / "out"), engine={"kv_cache_blocks": 31})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    # --progress none: only the error line (log mode adds the shard and model-loading lines).
    code = main(["run", str(tmp_path / "job.yaml"), "--progress", "none"])
    _, err = capsys.readouterr()
    assert code == 2
    assert err == (
        "llmbatch: error: KV cache too small: the pool holds 496 tokens (31 blocks of 16), "
        "fewer than one sequence of max_model_len 512 tokens, so longer rows could never run; "
        "raise engine.kv_cache_blocks to 32 or more (or set it to null to size the pool from "
        "engine.gpu_memory_utilization), or lower engine.max_model_len to 496 or less\n")
    assert not os.path.exists(tmp_path / "out")
    assert main(["run", str(tmp_path / "job.yaml"), "--progress", "none",
                 "--set", "engine.kv_cache_blocks=32"]) == 0


def _engine(num_kv_blocks, block_size=16, max_model_len=256):
    return types.SimpleNamespace(runner=types.SimpleNamespace(num_kv_blocks=num_kv_blocks),
                                 config=types.SimpleNamespace(block_size=block_size),
                                 max_model_len=max_model_len)


def test_memory_sized_pool_names_gpu_memory_utilization():
    # engine.kv_cache_blocks null: the pool came from the memory budget (the runtime refuses
    # such a pool itself, kv_pool.py; a custom engine may not).
    with pytest.raises(InvalidJobError) as info:
        check_kv_pool(_engine(5, block_size=32), 200, kv_cache_blocks=None)
    assert info.value.message == (
        "KV cache too small: the pool holds 160 tokens (5 blocks of 32), fewer than one "
        "sequence of max_model_len 200 tokens, so longer rows could never run; raise "
        "engine.gpu_memory_utilization (or set engine.kv_cache_blocks to 7 or more), or lower "
        "engine.max_model_len to 160 or less")


@pytest.mark.parametrize("engine", [
    _engine(16),                                  # exactly one max_model_len sequence
    _engine(None),                                # the fake engine without kv_cache_blocks
    types.SimpleNamespace(max_model_len=256),     # a custom engine that names no pool
], ids=["exact_fit", "unbounded", "no_pool"])
def test_pools_that_hold_a_sequence_or_name_no_size_pass(engine):
    check_kv_pool(engine, 256, kv_cache_blocks=16)


def test_memory_sized_pool_too_small_is_an_engine_setting_error(tmp_path, real_job):
    """kv_cache_blocks null, a memory budget below one max_model_len sequence: the runtime's
    own refusal (runtime/kv_pool.py) reads as a setting, exit 2, not as a model that fails to
    load; nothing written."""
    with pytest.raises(InvalidJobError) as info:
        run_job(real_job(cpu_kv_cache_bytes=4096))
    assert info.value.exit_code == 2
    assert info.value.message.startswith("invalid engine settings: KV cache too small: ")
    assert "raise cpu_kv_cache_bytes or lower max_model_len" in info.value.message
    assert not (tmp_path / "out").exists()
