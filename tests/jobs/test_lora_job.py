"""model.lora in a job: the adapter merged at load gives transformers + peft's greedy tokens on
the rendered prompts; a missing or unmergeable adapter is one line, exit 2, nothing written."""

import json
import os

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from llmbatch import run_job
from llmbatch.api import load
from llmbatch.jobs.errors import InvalidJobError


@pytest.fixture(scope="module")
def adapter_and_model(tiny_llama_dir, tmp_path_factory):
    pytest.importorskip("peft")
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(2)
    hf = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    model = get_peft_model(hf, LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                          target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.mul_(4.0)
    path = str(tmp_path_factory.mktemp("adapter"))
    model.save_pretrained(path)
    return path, model.merge_and_unload().eval()


def test_job_with_an_adapter_equals_peft(tmp_path, tiny_llama_dir, jobkit, monkeypatch,
                                         adapter_and_model):
    import torch
    from transformers import AutoTokenizer

    monkeypatch.delenv("LLMBATCH_ENGINE_FACTORY", raising=False)
    adapter, merged = adapter_and_model
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 4, seed=5)
    out = str(tmp_path / "out")
    job = jobkit.make_job(tiny_llama_dir, inp, out,
                          model={"path": tiny_llama_dir, "lora": adapter},
                          sampling={"max_new_tokens": 5, "ignore_eos": True},
                          engine={"kv_cache_blocks": 32, "device": "cpu"})
    assert run_job(job).num_rows_ok == 4
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompts = pq.read_table(inp).column("prompt").to_pylist()
    for row, prompt in zip(ds.dataset(out).to_table().to_pylist(), prompts):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            ref = merged.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                                  do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[0, ids.shape[1]:].tolist()
        assert row["output_token_ids"] == ref


def test_bad_adapters_are_one_line(tmp_path, tiny_llama_dir, jobkit, monkeypatch,
                                   adapter_and_model):
    import shutil

    monkeypatch.delenv("LLMBATCH_ENGINE_FACTORY", raising=False)
    adapter, _ = adapter_and_model
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 2)
    dora = tmp_path / "dora"
    shutil.copytree(adapter, dora)
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps(dict(cfg, use_dora=True)))
    for lora, message in ((str(dora), f"model.lora: LoRA adapter {str(dora)!r} uses DoRA, "
                                      f"which llmbatch does not merge"),
                          (str(tmp_path / "nope"), f"model.lora: {tmp_path / 'nope'} does not "
                                                   f"exist")):
        out = str(tmp_path / f"out-{os.path.basename(lora)}")
        job = jobkit.make_job(tiny_llama_dir, inp, out, model={"path": tiny_llama_dir,
                                                               "lora": lora},
                              engine={"kv_cache_blocks": 32, "device": "cpu"})
        with pytest.raises(InvalidJobError) as info:
            run_job(job)
        assert info.value.message == message
        assert not os.path.exists(os.path.join(out, "_manifest"))


def test_no_adapter_leaves_the_hash_alone():
    base = {"model": {"path": "m"}, "input": {"path": "x.parquet"}, "output": {"path": "o"}}
    plain = load(base).config_hash(1)
    assert load({**base, "model": {"path": "m", "lora": None}}).config_hash(1) == plain
    assert load({**base, "model": {"path": "m", "lora": "a"}}).config_hash(1) != plain


def test_a_bad_adapter_under_tensor_parallelism_is_the_same_line(tmp_path, tiny_llama_dir, jobkit,
                                                                 monkeypatch, adapter_and_model):
    import shutil

    monkeypatch.delenv("LLMBATCH_ENGINE_FACTORY", raising=False)
    adapter, _ = adapter_and_model
    biased = tmp_path / "biased"
    shutil.copytree(adapter, biased)
    cfg = json.loads((biased / "adapter_config.json").read_text())
    (biased / "adapter_config.json").write_text(json.dumps(dict(cfg, bias="lora_only")))
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 2)
    job = jobkit.make_job(tiny_llama_dir, inp, str(tmp_path / "out"),
                          model={"path": tiny_llama_dir, "lora": str(biased)},
                          parallel={"tensor_parallel_size": 2},
                          engine={"kv_cache_blocks": 32, "device": "cpu"})
    with pytest.raises(InvalidJobError) as info:
        run_job(job)
    assert info.value.message == (f"model.lora: LoRA adapter {str(biased)!r} trains biases "
                                  f"(bias: 'lora_only'), which llmbatch does not merge")
