"""One small job through the project's own runtime (tiny random Llama on CPU): the rows the job
writes carry exactly the greedy tokens transformers produces for the same rendered prompts."""

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest


def test_job_on_real_engine_matches_transformers(tmp_path, tiny_llama_dir, jobkit, monkeypatch):
    pytest.importorskip("llmbatch.runtime.engine")
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from llmbatch import run_job

    monkeypatch.delenv("LLMBATCH_ENGINE_FACTORY", raising=False)
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 6, seed=1)
    out = str(tmp_path / "out")
    result = run_job(jobkit.make_job(tiny_llama_dir, inp, out, sampling={"max_new_tokens": 4},
                                     engine={"kv_cache_blocks": 32, "device": "cpu"},
                                     output={"rows_per_part": 4}))
    assert (result.num_rows_ok, result.exit_code) == (6, 0)
    table = ds.dataset(out).to_table()
    assert table.column("id").to_pylist() == list(range(6))

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()
    prompts = pq.read_table(inp).column("prompt").to_pylist()
    for i, prompt in enumerate(prompts):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            ref = model.generate(ids, max_new_tokens=4, do_sample=False)[0, ids.shape[1]:]
        got = table.column("output_token_ids")[i].as_py()
        assert table.column("num_prompt_tokens")[i].as_py() == ids.shape[1]
        # The engine stops at EOS like generate does; compare the tokens it produced.
        assert got == ref.tolist()[:len(got)] and len(got) >= 1


def test_per_row_repetition_penalty_matches_transformers(tmp_path, tiny_llama_dir, jobkit,
                                                        monkeypatch):
    """sampling.per_row: [repetition_penalty] on the runtime engine: each row's greedy tokens are
    transformers' generate(repetition_penalty=<the row's value>) on the same rendered prompt."""
    pytest.importorskip("llmbatch.runtime.engine")
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from llmbatch import run_job

    monkeypatch.delenv("LLMBATCH_ENGINE_FACTORY", raising=False)
    penalties = [1.0, 1.5, 2.0, 0.8, 1.5, 1.0]
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 6, seed=2,
                               repetition_penalty=penalties)
    out = str(tmp_path / "out")
    result = run_job(jobkit.make_job(
        tiny_llama_dir, inp, out, engine={"kv_cache_blocks": 32, "device": "cpu"},
        sampling={"max_new_tokens": 8, "per_row": ["repetition_penalty"]}))
    assert (result.num_rows_ok, result.exit_code) == (6, 0)
    table = ds.dataset(out).to_table()
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()
    prompts = pq.read_table(inp).column("prompt").to_pylist()
    changed = 0
    for i, (prompt, p) in enumerate(zip(prompts, penalties)):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            ref = model.generate(ids, max_new_tokens=8, do_sample=False,
                                 repetition_penalty=p)[0, ids.shape[1]:].tolist()
            plain = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:]
        got = table.column("output_token_ids")[i].as_py()
        assert got == ref[:len(got)] and len(got) >= 1
        changed += ref != plain.tolist()
    assert changed >= 2   # the penalties change some rows' greedy output
