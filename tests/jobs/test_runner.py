"""End-to-end runs on the deterministic fake engine: order, columns, errors, modes, shards, resume."""

import os

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from llmbatch import run_job
from llmbatch.io.writer import read_part_metadata
from llmbatch.jobs.errors import InvalidJobError, ResumeError, RowError
from llmbatch.jobs.fake_engine import FakeEngine
from llmbatch.jobs.stats import STATS_METADATA_KEY, read_stats

RESULT_COLUMNS = ["id", "output_text", "output_token_ids", "finish_reason", "error",
                  "num_prompt_tokens", "num_cached_prompt_tokens", "num_output_tokens", "ttft_s",
                  "tpot_s", "latency_s", "spec_accepted_tokens"]


@pytest.fixture(autouse=True)
def _helpers(jobkit):
    global make_job, write_prompts
    make_job, write_prompts = jobkit.make_job, jobkit.write_prompts


@pytest.fixture
def prompts(tmp_path, _helpers):
    return write_prompts(str(tmp_path / "in.parquet"), 50, row=list(range(50)))


def expected_row(tok, prompt_text, max_new_tokens=8, template=True):
    """What the fake engine must produce for one prompt (mirrors FakeEngine._finish)."""
    text = f"<s><|user|>{prompt_text}\n<|assistant|>" if template else prompt_text
    ids = tok(text, add_special_tokens=not template)["input_ids"]
    natural = 2 + sum(ids) % 7
    n = min(natural, max_new_tokens)
    out = [ids[(sum(ids) + 7 * i) % len(ids)] for i in range(n)]
    return ids, out


def test_output_rows_columns_and_order(tmp_path, prompts, tiny_tokenizer_dir, fake_engine_env):
    out = str(tmp_path / "out")
    result = run_job(make_job(tiny_tokenizer_dir, prompts, out,
                              input={"keep_columns": ["row", "prompt"]},
                              output={"rows_per_part": 16}))
    assert [os.path.basename(p) for p in result.part_paths] == \
        [f"part-00000-0000{i}.parquet" for i in range(4)]
    table = ds.dataset(out).to_table()
    assert table.column_names == ["row", "prompt"] + RESULT_COLUMNS     # no logprobs column
    assert table.column("id").to_pylist() == list(range(50))
    assert table.column("row").to_pylist() == list(range(50))
    assert [pq.read_metadata(p).num_rows for p in result.part_paths] == [16, 16, 16, 2]
    assert read_part_metadata(result.part_paths[1])["row_start"] == 16
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    for row in table.slice(0, 10).to_pylist():
        ids, out_ids = expected_row(tok, row["prompt"])
        assert row["num_prompt_tokens"] == len(ids)
        assert row["output_token_ids"] == out_ids
        assert row["output_text"] == tok.decode(out_ids, skip_special_tokens=True)
        assert row["finish_reason"] == ("length" if len(out_ids) == 8 else "stop")
        assert row["error"] is None
    assert (result.num_rows, result.num_rows_ok, result.num_rows_error, result.exit_code) == \
        (50, 50, 0, 0)
    stats = read_stats(out).to_pylist()
    assert len(stats) == 1 and stats[0]["rows_ok"] == 50
    assert stats[0]["output_tokens"] == sum(table.column("num_output_tokens").to_pylist())
    assert stats[0]["gpu_name"] is None and stats[0]["config_hash"] == result.config_hash
    meta = pq.read_schema(result.stats_path).metadata[STATS_METADATA_KEY]
    assert b'"rows_ok": 50' in meta


def test_id_column_and_row_errors(tmp_path, tiny_tokenizer_dir, fake_engine_env):
    path = str(tmp_path / "in.parquet")
    long_prompt = " ".join(["hello world"] * 400)
    pq.write_table(pa.table({"uid": ["a", "b", "c", "d", "e"],
                             "prompt": ["one two", None, "", long_prompt, "cat dog"]}), path)
    result = run_job(make_job(tiny_tokenizer_dir, path, str(tmp_path / "out"),
                              input={"id_column": "uid"}))
    rows = ds.dataset(str(tmp_path / "out")).to_table().to_pylist()
    assert [r["id"] for r in rows] == ["a", "b", "c", "d", "e"]
    assert [r["finish_reason"] for r in rows][1:4] == ["error"] * 3
    assert rows[1]["error"] == "prompt is null" and rows[2]["error"] == "prompt is empty"
    assert rows[3]["error"].startswith("prompt has ") and \
        rows[3]["error"].endswith(", at least max_model_len (512): no room for an output token")
    assert rows[0]["error"] is None and rows[4]["error"] is None
    assert (result.num_rows_ok, result.num_rows_error, result.exit_code) == (2, 3, 3)


def test_on_row_error_fail_stops(tmp_path, tiny_tokenizer_dir, fake_engine_env):
    path = str(tmp_path / "in.parquet")
    pq.write_table(pa.table({"prompt": ["one", "two", None, "four"]}), path)
    with pytest.raises(RowError) as info:
        run_job(make_job(tiny_tokenizer_dir, path, str(tmp_path / "out"), on_row_error="fail"))
    assert str(info.value) == "row 2: prompt is null (on_row_error: fail)"
    assert info.value.exit_code == 2


def test_per_row_overrides(tmp_path, tiny_tokenizer_dir, fake_engine_env):
    path = write_prompts(str(tmp_path / "in.parquet"), 4,
                         max_new_tokens=[1, None, 2, 30], ignore_eos=[False, False, True, True])
    out = str(tmp_path / "out")
    run_job(make_job(tiny_tokenizer_dir, path, out,
                     sampling={"max_new_tokens": 5, "per_row": ["max_new_tokens", "ignore_eos"]}))
    rows = ds.dataset(out).to_table().to_pylist()
    counts = [r["num_output_tokens"] for r in rows]
    assert counts[0] == 1 and counts[2] == 2 and counts[3] == 30    # ignore_eos: exact length
    assert 1 <= counts[1] <= 5                                      # null -> job default (5)
    bad = write_prompts(str(tmp_path / "bad.parquet"), 2, temperature=[0.5, -1.0])
    result = run_job(make_job(tiny_tokenizer_dir, bad, str(tmp_path / "out2"),
                              sampling={"per_row": ["temperature"]}))
    rows = ds.dataset(str(tmp_path / "out2")).to_table().to_pylist()
    assert rows[0]["error"] is None
    assert rows[1]["error"] == ("invalid per-row sampling value: temperature must be >= 0 and fit a "
                              "float32 (<= 3.4e38), got -1.0")
    assert result.exit_code == 3


def test_chat_messages_and_system_prompt(tmp_path, tiny_tokenizer_dir, fake_engine_env):
    from transformers import AutoTokenizer

    path = str(tmp_path / "in.parquet")
    msgs = [[{"role": "user", "content": "hello"}], [{"role": "user", "content": "cat"}]]
    pq.write_table(pa.table({"m": msgs}), path)
    out = str(tmp_path / "out")
    run_job(make_job(tiny_tokenizer_dir, path, out, input={"messages_column": "m"},
                     model={"system_prompt": "brief"}))
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    rows = ds.dataset(out).to_table().to_pylist()
    expected = tok("<s><|system|>brief\n<|user|>hello\n<|assistant|>",
                   add_special_tokens=False)["input_ids"]
    assert rows[0]["num_prompt_tokens"] == len(expected)


def test_shards_partition_the_output(tmp_path, prompts, tiny_tokenizer_dir, fake_engine_env):
    out = str(tmp_path / "out")
    whole = str(tmp_path / "whole")
    run_job(make_job(tiny_tokenizer_dir, prompts, whole, output={"rows_per_part": 7}))
    for k in (2, 0, 1):        # any completion order
        run_job(make_job(tiny_tokenizer_dir, prompts, out, output={"rows_per_part": 7},
                         shard={"index": k, "count": 3}))
    parts = sorted(n for n in os.listdir(out) if n.startswith("part-"))
    assert parts[0] == "part-00000-00000.parquet" and parts[-1] == "part-00002-00002.parquet"
    got = ds.dataset(out).to_table()
    ref = ds.dataset(whole).to_table()
    assert got.column("id").to_pylist() == list(range(50))
    assert got.column("output_text").to_pylist() == ref.column("output_text").to_pylist()
    assert len(read_stats(out)) == 3


def test_modes_and_config_hash_refusal(tmp_path, prompts, tiny_tokenizer_dir, fake_engine_env):
    out = str(tmp_path / "out")
    job = make_job(tiny_tokenizer_dir, prompts, out, output={"rows_per_part": 20})
    first = run_job(job)
    again = run_job(job)                     # resume of a finished job: nothing to do
    assert again.num_rows_skipped == 50 and again.stats["rows_ok"] == 0
    assert again.part_paths == first.part_paths
    with pytest.raises(ResumeError) as info:
        run_job(job, sampling={"max_new_tokens": 9})
    assert "set output.mode: overwrite" in str(info.value) and info.value.exit_code == 2
    with pytest.raises(InvalidJobError, match="already holds results of shard 0; set "
                                              "output.mode: resume or overwrite"):
        run_job(job, output={"mode": "error"})
    redone = run_job(job, sampling={"max_new_tokens": 9}, output={"mode": "overwrite"})
    assert redone.num_rows_skipped == 0 and len(read_stats(out)) == 1
    assert ds.dataset(out).to_table().num_rows == 50
    # A new output folder with mode error is fine.
    run_job(job, output={"path": str(tmp_path / "fresh"), "mode": "error"})


def test_datasets_input(tmp_path, tiny_tokenizer_dir, fake_engine_env):
    import datasets

    datasets.Dataset.from_dict({"prompt": ["a b", "c d", "e f"]}).save_to_disk(
        str(tmp_path / "d"))
    out = str(tmp_path / "out")
    job = make_job(tiny_tokenizer_dir, None, out)
    job["input"] = {"dataset": str(tmp_path / "d"), "keep_columns": ["prompt"]}
    run_job(job)
    assert ds.dataset(out).to_table().column("prompt").to_pylist() == ["a b", "c d", "e f"]


def test_engine_factory_argument(tmp_path, prompts, tiny_tokenizer_dir):
    made = []

    def factory(config):
        made.append(config)
        return FakeEngine(config)

    run_job(make_job(tiny_tokenizer_dir, prompts, str(tmp_path / "out"),
                     engine={"block_size": 4}), engine_factory=factory)
    assert len(made) == 1 and made[0].block_size == 4 and made[0].model == tiny_tokenizer_dir


def test_logprobs_column_and_input_size_check(tmp_path, prompts, tiny_tokenizer_dir,
                                              fake_engine_env):
    out = str(tmp_path / "out")
    job = make_job(tiny_tokenizer_dir, prompts, out, sampling={"logprobs": 2})
    result = run_job(job)
    assert result.extra["engine_stats"]["num_requests"] == 50
    row = ds.dataset(out).to_table().slice(0, 1).to_pylist()[0]
    t = row["output_token_ids"][0]
    assert row["logprobs"][0] == {"token_id": t, "logprob": -0.5,
                                  "top": [{"token_id": t, "logprob": -0.5},
                                          {"token_id": t + 1, "logprob": -1.5}]}
    # The same job over an input that grew must not resume into shifted rows.
    write_prompts(prompts, 60)
    with pytest.raises(ResumeError, match="was written for an input of 50 rows, the input now "
                                          "has 60"):
        run_job(job)


def test_memory_stays_bounded_while_streaming(tmp_path, tiny_tokenizer_dir, jobkit):
    """Rows held in memory (in flight + finished, not yet committed) stay within one input batch
    + the engine's window + one part, however long the input."""
    from llmbatch.jobs.loader import load_job
    from llmbatch.jobs.runner import JobRunner

    inp = write_prompts(str(tmp_path / "in.parquet"), 600)
    spec = load_job(make_job(tiny_tokenizer_dir, inp, str(tmp_path / "out"),
                             input={"batch_size": 16}, output={"rows_per_part": 10}))
    held = []

    class Watching(FakeEngine):
        def generate(self, requests):
            for result in super().generate(requests):
                held.append(len(runner._samples) + len(runner._committer.finished))
                yield result

    runner = JobRunner(spec, engine_factory=Watching)
    result = runner.run()
    assert result.num_rows_ok == 600 and len(held) == 600
    assert max(held) <= 16 + 7 + 10


def test_a_resume_reads_each_committed_part_footer_once(tmp_path, prompts, tiny_tokenizer_dir,
                                                        fake_engine_env, monkeypatch):
    """plan() and Manifest.recover() both read every committed part's footer; with 100k parts
    on a network file system that doubled start-up I/O. The check under the shard lock (recover)
    is the one kept: the folder may change before the lock is taken."""
    import llmbatch.io.manifest as manifest
    from llmbatch.api import plan_job

    out = str(tmp_path / "out")
    job = make_job(tiny_tokenizer_dir, prompts, out, output={"rows_per_part": 5})   # 10 parts
    run_job(job)
    # What a kill after part 5 leaves: the later parts' entries and files gone.
    for seq in range(9, 5, -1):
        os.remove(os.path.join(out, "_manifest", f"part-00000-{seq:05d}.json"))
        os.remove(os.path.join(out, f"part-00000-{seq:05d}.parquet"))
    reads = []
    real = manifest.part_defect

    def counting(path, entry):
        reads.append(os.path.basename(path))
        return real(path, entry)

    monkeypatch.setattr(manifest, "part_defect", counting)
    result = run_job(job)
    assert result.num_rows_skipped == 30 and result.exit_code == 0
    assert reads == [f"part-00000-{seq:05d}.parquet" for seq in range(6)]
    # Still checked under the lock: a part damaged since the last run is found, once.
    reads.clear()
    with open(os.path.join(out, "part-00000-00002.parquet"), "wb") as f:
        f.write(b"not parquet")
    assert run_job(job).num_rows_skipped == 10
    assert reads == [f"part-00000-{seq:05d}.parquet" for seq in range(3)]
    assert ds.dataset(out).to_table().column("id").to_pylist() == list(range(50))
    # `llmbatch plan` loads no model and takes no lock: it reads them itself, once.
    reads.clear()
    assert plan_job(job).rows_done == 50
    assert reads == [f"part-00000-{seq:05d}.parquet" for seq in range(10)]
