"""CLI: malformed jobs and inputs give ONE line on stderr, exit 2, no traceback, nothing written;
run/validate/plan/merge/stats and progress modes."""

import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import yaml

import llmbatch
from llmbatch.cli import main


@pytest.fixture
def env(tmp_path, tiny_tokenizer_dir, tiny_tokenizer_no_template_dir, fake_engine_env, jobkit,
        monkeypatch):
    """A valid job file + input in tmp_path; returns a helper namespace."""
    import types

    monkeypatch.chdir(tmp_path)
    jobkit.write_prompts("in.parquet", 12, row=list(range(12)))
    job = jobkit.make_job(tiny_tokenizer_dir, "in.parquet", "out")

    def write(data=None, text=None, name="job.yaml"):
        with open(name, "w") as f:
            f.write(text if text is not None else yaml.safe_dump(data))
        return name

    return types.SimpleNamespace(job=job, write=write, tok=tiny_tokenizer_dir,
                                 plain_tok=tiny_tokenizer_no_template_dir, path=tmp_path)


def call(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def with_(job, section, **values):
    import copy

    job = copy.deepcopy(job)
    if section is None:
        job.update(values)
    else:
        job.setdefault(section, {}).update(values)
    return job


MALFORMED = [
    ("missing job file", lambda e: "nope.yaml", "job file not found: nope.yaml"),
    ("bad yaml", lambda e: e.write(text="model: {path: [\n"), "invalid YAML at line"),
    ("empty file", lambda e: e.write(text=""), "is empty"),
    ("unknown key", lambda e: e.write(with_(e.job, "sampling", temprature=0.5)),
     "unknown key 'temprature' in section 'sampling' (did you mean 'temperature'?)"),
    ("unknown section", lambda e: e.write(with_(e.job, None, sampler={})),
     "unknown key 'sampler' at the top level (did you mean 'sampling'?)"),
    ("wrong type", lambda e: e.write(with_(e.job, "output", rows_per_part="lots")),
     "output.rows_per_part: expected an integer, got 'lots'"),
    ("bad choice", lambda e: e.write(with_(e.job, "engine", ordering="random")),
     "engine.ordering: expected one of 'prefix', 'input', got 'random'"),
    ("unset env var", lambda e: e.write(with_(e.job, "input", path="${LLMBATCH_NO_SUCH_VAR}")),
     "input.path: environment variable LLMBATCH_NO_SUCH_VAR is not set"),
    ("missing input", lambda e: e.write(with_(e.job, "input", path="nothing.parquet")),
     "input.path: nothing.parquet does not exist"),
    ("missing prompt column", lambda e: e.write(with_(e.job, "input", prompt_column="text")),
     "input.prompt_column: column 'text' not in input (columns: prompt, row)"),
    ("missing id column", lambda e: e.write(with_(e.job, "input", id_column="uid")),
     "input.id_column: column 'uid' not in input"),
    ("prompt column not text", lambda e: e.write(with_(e.job, "input", prompt_column="row")),
     "input.prompt_column 'row' has type int64, expected string"),
    ("per-row column missing", lambda e: e.write(with_(e.job, "sampling", per_row=["seed"])),
     "sampling.per_row: column 'seed' not in input"),
    ("corrupt input", lambda e: (open("bad.parquet", "wb").write(b"PAR1 junk"),
                                 e.write(with_(e.job, "input", path="bad.parquet")))[1],
     "cannot read input"),
    ("messages without template", lambda e: e.write(with_(
        with_(e.job, "model", path=e.plain_tok), "input", messages_column="row")),
     "input.messages_column 'row' has type int64"),
    ("system prompt without template", lambda e: e.write(with_(
        e.job, "model", path=e.plain_tok, system_prompt="hi")),
     "model.system_prompt needs a chat template"),
    ("template file missing", lambda e: e.write(with_(e.job, "model", chat_template="t.jinja")),
     "model.chat_template: file not found: t.jinja"),
    ("model path missing", lambda e: e.write(with_(e.job, "model", path="./no-model-here")),
     "model.path: ./no-model-here does not exist"),
    ("model dir without tokenizer", lambda e: (os.makedirs("empty-model"), e.write(with_(
        e.job, "model", path=os.path.abspath("empty-model"))))[1],
     "cannot load the tokenizer"),   # the fake engine loads only the tokenizer
    ("shard out of range", lambda e: e.write(with_(e.job, "shard", index=3, count=2)),
     "shard.index must be in [0, 1] for shard.count=2, got 3"),
    ("invalid engine setting", lambda e: e.write(with_(e.job, "engine", block_size=12)),
     "invalid engine/sampling settings: block_size must be a power of two >= 1, got 12"),
]


@pytest.mark.parametrize("name, make, message", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_job_or_input(env, capsys, name, make, message):
    job_path = make(env)
    code, out, err = call(capsys, "run", job_path, "--progress", "none")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("llmbatch: error: "), err
    assert message in err
    assert "Traceback" not in err and out == ""
    assert not os.path.exists(env.path / "out")          # nothing written


def _broken_model(src, dst, name):
    """A copy of the tiny Llama checkpoint `src` at `dst`, broken the way `name` says."""
    import json
    import shutil

    shutil.copytree(src, dst)
    config = os.path.join(dst, "config.json")
    if name == "no config.json":
        os.remove(config)
    elif name == "no weights":
        os.remove(os.path.join(dst, "model.safetensors"))
    elif name == "config.json not JSON":
        with open(config, "w") as f:
            f.write("{not json")
    elif name == "config value of the wrong type":
        with open(config) as f:
            data = json.load(f)
        with open(config, "w") as f:
            json.dump({**data, "hidden_size": "big"}, f)
    elif name == "zero attention heads":
        with open(config) as f:
            data = json.load(f)
        with open(config, "w") as f:
            json.dump({**data, "num_attention_heads": 0}, f)
    elif name == "damaged weights":
        with open(os.path.join(dst, "model.safetensors"), "wb") as f:
            f.write(b"\0" * 100)
    return dst


# The model named by the job cannot be loaded: a user input error (one line, exit 2, nothing
# written), through the real engine. A Hub id this machine cannot fetch used to end as
# "internal error: RuntimeError", exit 1; the two library errors likewise.
BAD_MODELS = [
    ("hub id that cannot be fetched", "model.path meta-llama/Llama-3.2-1B: cannot load the "
     "model: model 'meta-llama/Llama-3.2-1B' is not a local directory and could not be fetched "
     "from the Hugging Face Hub ("),
    ("no config.json", "model: cannot load the model: "),   # "<dir> has no config.json ..."
    ("no weights", "cannot load the model: no weights found in "),
    ("config.json not JSON", "cannot load the model: It looks like the config file at "),
    ("config value of the wrong type", "model/config.json is not a valid model config: "
     "StrictDataclassFieldValidationError: Validation error for field 'hidden_size': TypeError: "
     "Field 'hidden_size' expected int, got str (value: 'big')"),
    ("damaged weights", "cannot load the model: SafetensorError: Error while deserializing "
     "header: "),
    # transformers' own config validator divides by it (was "internal error", exit 1).
    ("zero attention heads", "model/config.json is not a valid model config: "
     "ZeroDivisionError: integer modulo by zero"),
]


@pytest.mark.parametrize("name, message", BAD_MODELS, ids=[m[0] for m in BAD_MODELS])
def test_a_model_that_cannot_be_loaded_is_one_line_exit_2(env, capsys, monkeypatch,
                                                          tiny_llama_dir, name, message):
    monkeypatch.delenv("LLMBATCH_ENGINE_FACTORY")     # the real engine (HF_HUB_OFFLINE=1)
    path = "meta-llama/Llama-3.2-1B" if name.startswith("hub") else \
        _broken_model(tiny_llama_dir, str(env.path / "model"), name)
    code, out, err = call(capsys, "run", env.write(with_(env.job, "model", path=path)),
                          "--progress", "none")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("llmbatch: error: model.path "), err
    assert message in err and "internal error" not in err
    assert "Traceback" not in err and out == ""
    assert not os.path.exists(env.path / "out")          # nothing written


def test_bad_set_and_usage_errors_are_one_line(env, capsys):
    job = env.write(env.job)
    code, _, err = call(capsys, "run", job, "--set", "sampling.max_new_tokens")
    assert code == 2 and err == ("llmbatch: error: --set 'sampling.max_new_tokens': expected "
                                 "section.key=value\n")
    code, _, err = call(capsys, "run", job, "--progress", "fancy")
    assert code == 2 and err.count("\n") == 1 and "'fancy' is not one of" in err
    code, _, err = call(capsys, "frobnicate")
    assert code == 2 and err.count("\n") == 1 and "No such command 'frobnicate'" in err
    # A negative interval printed a line per row.
    code, _, err = call(capsys, "run", job, "--progress", "log", "--log-every", "-5")
    assert code == 2 and err == ("llmbatch: error: Invalid value for '--log-every': -5.0 is not "
                                 "in the range x>=0.\n")
    code, _, err = call(capsys, "run", job, "--log-every", "nan")
    assert code == 2 and err == ("llmbatch: error: log_every_s must be a number of seconds "
                                 ">= 0, got nan\n")
    assert not os.path.exists(env.path / "out")


def test_run_with_set_and_log_progress(env, capsys):
    job = env.write(env.job)
    code, out, err = call(capsys, "run", job, "--set", "output.rows_per_part=5",
                          "--progress", "log", "--log-every", "0")
    assert code == 0
    assert out.splitlines()[0].startswith("shard 0/1: 12 rows (12 ok, 0 error, 0 resumed)")
    assert out.splitlines()[1] == f"output: {env.path / 'out'}"
    lines = err.splitlines()
    assert lines[0].startswith("llmbatch: shard 0/1: rows [0, 12) of 12 from ")
    assert lines[1] == f"llmbatch: loading model {env.tok}"
    assert lines[-2].startswith("llmbatch: 12/12 rows (100.0%), out ")
    assert lines[-1].startswith("llmbatch: done in ")
    assert len(ds.dataset("out").files) == 3
    code, out, _ = call(capsys, "run", job, "--set", "output.rows_per_part=5")
    assert code == 0 and "(12 ok, 0 error, 12 resumed)" in out


def test_row_errors_exit_3(env, capsys):
    pq.write_table(pa.table({"prompt": ["fine", None]}), "some_bad.parquet")
    code, out, err = call(capsys, "run", env.write(with_(env.job, "input",
                                                         path="some_bad.parquet")),
                          "--progress", "bar")
    assert code == 3 and "(1 ok, 1 error" in out
    assert "rows" in err            # the bar was drawn on stderr


def test_validate_prints_effective_config(env, capsys):
    code, out, err = call(capsys, "validate", env.write(env.job), "--set",
                          "sampling.temperature=0.25")
    assert code == 0 and err == ""
    shown = yaml.safe_load(out)
    assert shown["sampling"]["temperature"] == 0.25
    assert shown["output"] == {"path": "out", "rows_per_part": 10000, "mode": "resume"}
    assert out.splitlines()[-1].startswith("# shard 0 of 1, config hash ")
    assert not os.path.exists(env.path / "out")


def test_plan_merge_and_stats(env, capsys):
    job = env.write(with_(env.job, "output", rows_per_part=5))
    code, out, _ = call(capsys, "plan", job, "--set", "shard.count=2", "--set", "shard.index=1")
    assert code == 0 and "shard 1 of 2: rows [6, 12) = 6 rows; 0 done, 6 to run" in out
    assert call(capsys, "run", job)[0] == 0
    code, out, _ = call(capsys, "plan", job)
    assert "12 done, 0 to run" in out
    code, out, _ = call(capsys, "merge", "out", "-o", "merged.parquet")
    assert code == 0 and out == "merged 3 parts, 12 rows -> merged.parquet\n"
    assert pq.read_table("merged.parquet").column("id").to_pylist() == list(range(12))
    code, out, _ = call(capsys, "stats", "out")
    assert code == 0 and "rows_ok=12" in out and "gpu_name=None" in out
    code, _, err = call(capsys, "stats", "nowhere")
    assert code == 2 and err.count("\n") == 1


def test_console_subprocess_has_no_traceback(env):
    job = env.write(with_(env.job, "sampling", temprature=1))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(llmbatch.__file__)))
    proc = subprocess.run([sys.executable, "-m", "llmbatch.cli", "run", job],
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": repo})
    assert proc.returncode == 2
    assert proc.stderr == ("llmbatch: error: unknown key 'temprature' in section 'sampling' "
                           "(did you mean 'temperature'?)\n")


def test_help_and_version(capsys):
    code, out, _ = call(capsys)
    assert code == 0 and out.startswith("Usage: llmbatch [OPTIONS] COMMAND")
    code, out, _ = call(capsys, "--version")
    assert code == 0 and out == f"llmbatch {llmbatch.__version__}\n"
    code, _, err = call(capsys, "run")
    assert (code, err) == (2, "llmbatch: error: Missing argument 'JOB'.\n")
