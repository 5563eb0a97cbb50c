"""Job schema: one-line errors naming key/section/closest key, env expansion, --set, hash, mapping."""

import copy

import pytest

from llmbatch.jobs.errors import InvalidJobError
from llmbatch.jobs.loader import apply_overrides, expand_env, load_job, parse_set
from llmbatch.runtime.config import EngineConfig
from llmbatch.runtime.sampling_params import SamplingParams

BASE = {"model": {"path": "m"}, "input": {"path": "x.parquet"}, "output": {"path": "o"}}


def job(**sections):
    d = copy.deepcopy(BASE)
    d.update(sections)
    return d


def error_of(data, **kw):
    with pytest.raises(InvalidJobError) as info:
        load_job(data, **kw)
    assert "\n" not in str(info.value)
    assert info.value.exit_code == 2
    return str(info.value)


@pytest.mark.parametrize("data, message", [
    (job(sampling={"temprature": 1.0}),
     "unknown key 'temprature' in section 'sampling' (did you mean 'temperature'?)"),
    (job(modle={}), "unknown key 'modle' at the top level (did you mean 'model'?)"),
    (job(engine={"prefix_cache": False}),
     "unknown key 'prefix_cache' in section 'engine' (did you mean 'prefix_caching'?)"),
    (job(sampling={"max_new_tokens": "many"}),
     "sampling.max_new_tokens: expected an integer, got 'many'"),
    (job(engine={"prefix_caching": "maybe"}),
     "engine.prefix_caching: expected a boolean (true/false), got 'maybe'"),
    (job(output={"path": "o", "mode": "append"}),
     "output.mode: expected one of 'resume', 'overwrite', 'error', got 'append'"),
    (job(shard={"index": "first"}),
     "shard.index: expected one of 'auto' or an integer, got 'first'"),
    (job(sampling=3), "sampling: expected a mapping, got 3"),
    (job(input={"path": "a", "dataset": "b"}),
     "input: set exactly one of input.path and input.dataset"),
    (job(sampling={"top_p": 0}), "sampling.top_p: must be greater than 0 (got 0)"),
    # Accepted silently before: -5 acted as "off", true as 1, '' and -1 matched nothing.
    (job(sampling={"top_k": -5}),
     "sampling.top_k: must be -1 or 0 (off) or a positive number of tokens (got -5)"),
    (job(sampling={"stop_token_ids": [2, -1]}),
     "sampling.stop_token_ids: token ids are >= 0, got -1 (got [2, -1])"),
    (job(sampling={"stop": ["x", ""]}),
     "sampling.stop: an empty stop string stops nothing; remove it (got ['x', ''])"),
    (job(shard={"index": True}), "shard.index: expected one of 'auto' or an integer, got True"),
    (job(shard={"count": False}), "shard.count: expected one of 'auto' or an integer, got False"),
    (job(sampling={"max_new_tokens": True}),
     "sampling.max_new_tokens: expected an integer, got True"),
    (job(sampling={"stop_token_ids": [True]}),
     "sampling.stop_token_ids: expected an integer, got True"),
    (job(sampling={"temperature": True}), "sampling.temperature: expected a number, got True"),
    (job(engine={"max_model_len": True}), "engine.max_model_len: expected an integer, got True"),
    # An empty output.path wrote the parts into the current directory; an empty model.path
    # said "model.path: does not exist" without a value.
    (job(output={"path": ""}), "output.path is empty; name the output directory"),
    (job(model={"path": " "}), "model.path is empty; name a model directory or Hub id"),
    (job(model={"path": "m", "tokenizer": ""}), "model.tokenizer is empty; name a tokenizer "
     "directory or Hub id, or leave it out to use model.path"),
    (job(model={"path": "m", "chat_template": ""}),
     "model.chat_template is empty; use auto, none or a path to a Jinja template"),
    (job(input={"dataset": ""}), "input.dataset is empty; name a dataset folder or Hub id"),
    (job(speculative={"method": "draft", "draft_model": ""}),
     "speculative.draft_model is empty; name a model directory or Hub id"),
    (job(input={"path": ["a", ""]}), "input.path is empty; name a file, glob, directory or URL"),
])
def test_invalid_job_messages(data, message):
    assert error_of(data) == message


def test_missing_required_key_and_section():
    d = job()
    del d["model"]["path"]
    assert error_of(d) == "missing required key 'path' in section 'model'"
    d = job()
    del d["output"]
    assert error_of(d) == "missing required section 'output'"


def test_per_row_must_name_sampling_keys():
    msg = error_of(job(sampling={"per_row": ["temperature", "colour"]}))
    assert msg.startswith("sampling.per_row: 'colour' is not a sampling key")
    msg = error_of(job(sampling={"per_row": ["temperature", "seed", "temperature"]}))
    assert msg == ("sampling.per_row: names 'temperature' more than once (got ['temperature', "
                   "'seed', 'temperature'])")


def test_defaults_match_the_contract():
    spec = load_job(job())
    assert spec.output.rows_per_part == 10000 and spec.output.mode == "resume"
    assert spec.model.chat_template == "auto" and spec.model.system_prompt is None
    assert spec.input.prompt_column == "prompt" and spec.input.split == "train"
    assert spec.sampling.max_new_tokens == 256 and spec.sampling.top_k == -1
    assert spec.engine.ordering == "prefix" and spec.engine.block_size == 16
    assert spec.shard.index == "auto" and spec.on_row_error == "record"


def test_env_expansion(monkeypatch):
    monkeypatch.setenv("DATA_ROOT", "/data")
    spec = load_job(job(input={"path": "${DATA_ROOT}/in/*.parquet"},
                        output={"path": "${OUT_DIR:-out}/run"}))
    assert spec.input.path == "/data/in/*.parquet"
    assert spec.output.path == "out/run"
    monkeypatch.delenv("NOPE_NOT_SET", raising=False)
    assert error_of(job(output={"path": "${NOPE_NOT_SET}"})) == \
        "output.path: environment variable NOPE_NOT_SET is not set"
    assert expand_env("cost $${HOME}") == "cost ${HOME}"


def test_set_overrides_are_yaml_scalars():
    assert parse_set("sampling.temperature=0.7") == (["sampling", "temperature"], 0.7)
    assert parse_set("sampling.stop=[a, b]") == (["sampling", "stop"], ["a", "b"])
    assert parse_set("engine.prefix_caching=false") == (["engine", "prefix_caching"], False)
    assert parse_set("model.system_prompt=Be brief: yes") == \
        (["model", "system_prompt"], "Be brief: yes")
    spec = load_job(job(), sets=["sampling.max_new_tokens=12", "on_row_error=fail",
                                 "shard.count=4", "shard.index=3"])
    assert spec.sampling.max_new_tokens == 12 and spec.on_row_error == "fail"
    assert (spec.shard.index, spec.shard.count) == (3, 4)
    with pytest.raises(InvalidJobError, match="expected section.key=value"):
        parse_set("sampling.temperature")
    assert error_of(job(), sets=["sampling.temprature=1"]) == \
        "unknown key 'temprature' in section 'sampling' (did you mean 'temperature'?)"


def test_keyword_overrides_merge_sections():
    merged = apply_overrides(job(sampling={"max_new_tokens": 4, "seed": 3}),
                             overrides={"sampling": {"seed": 9}, "on_row_error": "fail"})
    assert merged["sampling"] == {"max_new_tokens": 4, "seed": 9}
    assert merged["on_row_error"] == "fail"


def test_config_hash_covers_results_not_locations(tmp_path):
    base = load_job(job()).config_hash(1)
    assert load_job(job(output={"path": "elsewhere", "mode": "overwrite"})).config_hash(1) == base
    assert load_job(job(engine={"max_num_seqs": 8})).config_hash(1) == base
    assert load_job(job(sampling={"temperature": 0.5})).config_hash(1) != base
    assert load_job(job(output={"path": "o", "rows_per_part": 5})).config_hash(1) != base
    assert load_job(job()).config_hash(2) != base
    template = tmp_path / "t.jinja"
    template.write_text("A")
    with_file = load_job(job(model={"path": "m", "chat_template": str(template)})).config_hash(1)
    template.write_text("B")
    assert load_job(job(model={"path": "m", "chat_template": str(template)})).config_hash(1) \
        != with_file


def test_engine_config_mapping():
    spec = load_job(job(model={"path": "m", "dtype": "float32"},
                        engine={"block_size": 32, "ordering": "input", "kv_cache_blocks": 64},
                        parallel={"tensor_parallel_size": 2}, quantization={"method": "nf4"},
                        speculative={"method": "ngram", "num_tokens": 3},
                        sampling={"seed": 7}))
    cfg = spec.engine_config()
    assert isinstance(cfg, EngineConfig)
    assert (cfg.model, cfg.dtype, cfg.block_size, cfg.ordering, cfg.kv_cache_blocks) == \
        ("m", "float32", 32, "input", 64)
    assert (cfg.tensor_parallel_size, cfg.quantization, cfg.speculative_method,
            cfg.num_speculative_tokens, cfg.seed) == (2, "nf4", "ngram", 3, 7)
    assert cfg.async_scheduling is None   # auto: the engine decides


def test_async_and_skinny_keys_map_and_keep_the_hash():
    base = load_job(job(model={"path": "m"}))
    spec = load_job(job(model={"path": "m"}, engine={"async_scheduling": True}))
    assert spec.engine_config().async_scheduling is True
    assert spec.config_hash(1) == base.config_hash(1)   # a speed knob: same rows, same text
    skinny = load_job(job(model={"path": "m"}, engine={"skinny_matmul": True}))
    assert skinny.engine_config().skinny_matmul is True
    assert skinny.config_hash(1) == base.config_hash(1)
    pdl = load_job(job(model={"path": "m"}, engine={"skinny_matmul": True, "pdl": True}))
    assert pdl.engine_config().pdl is True and pdl.config_hash(1) == base.config_hash(1)
    # skinny_gemv and pdl are auto (null) by default: the engine decides per device.
    assert (base.engine_config().skinny_gemv, base.engine_config().pdl) == (None, None)
    off = load_job(job(model={"path": "m"}, engine={"skinny_gemv": False, "pdl": False}))
    assert (off.engine_config().skinny_gemv, off.engine_config().pdl) == (False, False)
    assert off.config_hash(1) == base.config_hash(1)
    # With speculation, the engine drafts in synchronous steps at small batches (Engine.step).
    with_spec = load_job(job(model={"path": "m"}, engine={"async_scheduling": True},
                             speculative={"method": "ngram"})).engine_config()
    assert (with_spec.async_scheduling, with_spec.speculative_method) == (True, "ngram")


def test_sampling_params_per_row_and_seed_offset():
    spec = load_job(job(sampling={"max_new_tokens": 10, "seed": 5, "stop": ["x"]}))
    sp = spec.sampling_params({"temperature": 0.8, "max_new_tokens": None}, row_seed_offset=3)
    assert isinstance(sp, SamplingParams)
    # seed: splitmix64 of (5, row 3), tests/jobs/test_row_seeds.py (it was 5 + 3).
    assert (sp.max_new_tokens, sp.temperature, sp.seed, sp.stop) == \
        (10, 0.8, -4263995026347871831, ["x"])
    assert spec.sampling_params({"seed": 42}, row_seed_offset=3).seed == 42
    with pytest.raises(ValueError):
        spec.sampling_params({"max_new_tokens": 0})


def test_top_k_off_values_and_numbers_still_load(monkeypatch):
    for top_k in (-1, 0, 1, 50):     # 0 is stored as -1 (test_top_k_hash.py)
        assert load_job(job(sampling={"top_k": top_k})).sampling.top_k == (top_k or -1)
    # Numbers from ${ENV} expansion arrive as text: still parsed (only booleans are refused).
    monkeypatch.setenv("LLMBATCH_TEST_TOKENS", "7")
    spec = load_job(job(sampling={"max_new_tokens": "${LLMBATCH_TEST_TOKENS}"}))
    assert spec.sampling.max_new_tokens == 7
    assert load_job(job(shard={"index": 1, "count": 2})).shard.index == 1


@pytest.mark.parametrize("key, value, message", [
    ("top_k", -5, "top_k must be -1 or 0 (off) or a positive number of tokens, got -5"),
    ("top_k", -2.0, "top_k must be -1 or 0 (off) or a positive number of tokens, got -2"),
    ("stop", "", "stop must be a non-empty string or a list of them, got ''"),
    ("stop", ["a", ""], "stop must be a non-empty string or a list of them, got ['a', '']"),
    ("stop_token_ids", [3, -1], "stop_token_ids must be a list of integers >= 0, got [3, -1]"),
])
def test_per_row_values_the_job_would_refuse_are_row_errors(key, value, message):
    spec = load_job(job())
    with pytest.raises(ValueError) as info:
        spec.sampling_params({key: value})
    assert str(info.value) == message
    assert spec.sampling_params({"top_k": 0, "stop": "x", "stop_token_ids": [0]}).stop == ["x"]


def test_duplicate_keys_in_the_job_file_are_refused(tmp_path):
    # YAML's last-wins silently dropped the first section.
    path = tmp_path / "job.yaml"
    path.write_text("model: {path: m}\ninput: {path: x.parquet}\noutput: {path: o}\n"
                    "model: {path: other}\n")
    assert error_of(str(path)) == (f"job file {path}: duplicate key 'model' at line 4 "
                                   f"(first at line 1)")
    path.write_text("model:\n  path: m\n  dtype: auto\n  path: n\n"
                    "input: {path: x.parquet}\noutput: {path: o}\n")
    assert error_of(str(path)) == (f"job file {path}: duplicate key 'path' at line 4 "
                                   f"(first at line 2)")
    # A merge key's values may be overridden: not a duplicate.
    path.write_text("model: &m {path: m}\ninput: {path: x.parquet}\n"
                    "output: {<<: *m, path: o}\n")
    assert load_job(str(path)).output.path == "o"


@pytest.mark.parametrize("section, key, short, long", [
    ("sampling", "stop", "###", ["###"]),          # vLLM's SamplingParams(stop="###")
    ("model", "dtype", "half", "float16"),
    ("model", "dtype", "float", "float32"),
    ("model", "dtype", "bf16", "bfloat16"),
])
def test_vllm_spellings_are_taken_as_the_long_form_with_its_hash(section, key, short, long):
    """They were refused ('sampling.stop: expected a list', 'model.dtype: expected one of
    ...'); now stored as the long form, so both spellings run one job (same config hash)."""
    def spec_with(value):
        sections = {"model": {"path": "m"}}
        sections.setdefault(section, {})[key] = value
        return load_job(job(**sections))
    a, b = spec_with(short), spec_with(long)
    assert getattr(getattr(a, section), key) == long
    assert a.config_hash(1) == b.config_hash(1)
