"""sampling.bad_words in a job: job-wide and per row (a string or list column), reaching the
engine; the output never contains a banned word's tokens (runtime engine)."""

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from llmbatch import run_job
from llmbatch.api import load
from llmbatch.jobs.errors import InvalidJobError

BASE = {"model": {"path": "m"}, "input": {"path": "x.parquet"}, "output": {"path": "o"}}


def test_values_hash_and_refusals():
    plain = load(BASE).config_hash(1)
    assert load({**BASE, "sampling": {"bad_words": []}}).config_hash(1) == plain
    spec = load({**BASE, "sampling": {"bad_words": "spam", "per_row": ["bad_words"]}})
    assert spec.config_hash(1) != plain
    assert spec.sampling_params().bad_words == ["spam"]
    assert spec.sampling_params({"bad_words": "eggs"}).bad_words == ["eggs"]
    assert spec.sampling_params({"bad_words": None}).bad_words == ["spam"]
    with pytest.raises(ValueError, match=r"bad_words must be a non-empty string or a list of "
                                         r"them, got \[' '\]"):
        spec.sampling_params({"bad_words": [" "]})
    with pytest.raises(InvalidJobError) as info:
        load({**BASE, "sampling": {"bad_words": ["ok", "  "]}})
    assert info.value.message == ("sampling.bad_words: a blank bad word bans nothing; remove it "
                                  "(got ['ok', ' '])")


def test_banned_words_never_appear(tmp_path, tiny_llama_dir, jobkit, monkeypatch):
    from transformers import AutoTokenizer

    from llmbatch.runtime.token_rules import bad_word_sequences

    monkeypatch.delenv("LLMBATCH_ENGINE_FACTORY", raising=False)
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 6, seed=7)
    common = dict(engine={"kv_cache_blocks": 32, "device": "cpu"})
    plain_out = str(tmp_path / "plain")
    run_job(jobkit.make_job(tiny_llama_dir, inp, plain_out,
                            sampling={"max_new_tokens": 8, "ignore_eos": True}, **common))
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    plain = ds.dataset(plain_out).to_table().column("output_token_ids").to_pylist()
    # Ban the single-token words the plain run produced most.
    counts = {}
    for ids in plain:
        for t in ids:
            counts[t] = counts.get(t, 0) + 1
    top = sorted(counts, key=counts.get, reverse=True)
    words = [w for w in (tok.decode([t]).strip() for t in top) if w][:3]
    seqs = bad_word_sequences(tok, words)
    path = str(tmp_path / "in2.parquet")
    pq.write_table(pq.read_table(inp).append_column(
        "bad_words", pa.array([words[:1], None, words, None, words[1:], None])), path)
    out = str(tmp_path / "out")
    run_job(jobkit.make_job(tiny_llama_dir, path, out, **common,
                            sampling={"max_new_tokens": 8, "ignore_eos": True,
                                      "bad_words": words[2:], "per_row": ["bad_words"]}))
    rows = ds.dataset(out).to_table().column("output_token_ids").to_pylist()
    row_words = [words[:1], words[2:], words, words[2:], words[1:], words[2:]]
    for ids, banned in zip(rows, row_words):
        for seq in bad_word_sequences(tok, banned):
            assert not any(ids[i:i + len(seq)] == seq for i in range(len(ids))), (ids, seq)
    assert rows != plain and seqs
