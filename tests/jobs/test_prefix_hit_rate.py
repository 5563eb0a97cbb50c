"""W-PREFIX in miniature through a whole job on the project's runtime (CPU, tiny model):
8 shared prefixes, requests interleaved in the input, and the job's stats must show that at
least 85 % of prompt tokens came from the prefix cache (the planner finds the groups)."""

import random

import pyarrow as pa
import pyarrow.parquet as pq


def test_interleaved_shared_prefixes_hit_the_cache(tmp_path, tiny_tokenizer_dir, jobkit,
                                                   monkeypatch):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from llmbatch import run_job

    monkeypatch.delenv("LLMBATCH_ENGINE_FACTORY", raising=False)
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    model_dir = tmp_path / "model"
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=2048, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)

    rng = random.Random(0)
    words = [f"w{i}" for i in range(200)]
    prefixes = [" ".join(rng.choice(words) for _ in range(300)) for _ in range(8)]
    # Request i uses prefix i % 8 (interleaved, as in BENCH.md's W-PREFIX) + a unique tail.
    prompts = [prefixes[i % 8] + " " + " ".join(rng.choice(words) for _ in range(rng.randint(8, 30)))
               for i in range(256)]
    inp = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": prompts}), inp)
    out = tmp_path / "out"
    result = run_job(jobkit.make_job(
        str(model_dir), str(inp), str(out),
        model={"chat_template": "none"},
        sampling={"max_new_tokens": 4, "ignore_eos": True},
        engine={"device": "cpu", "max_num_seqs": 64, "kv_cache_blocks": 2048}))
    assert result.exit_code == 0
    stats = result.stats
    prompt_tokens = stats["prompt_tokens"]
    assert prompt_tokens > 256 * 600          # the prefixes are long, as in W-PREFIX
    assert stats["prefix_hit_rate"] >= 0.85, stats["prefix_hit_rate"]
