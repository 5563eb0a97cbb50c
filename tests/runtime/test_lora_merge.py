"""A PEFT LoRA adapter merged at load (EngineConfig.lora): greedy output equals transformers +
peft on the same adapter (merge_and_unload), at tensor_parallel_size 1 and 2; adapters that
cannot be merged are refused in one line."""

from __future__ import annotations

import json
import os

import pytest
import torch

peft = pytest.importorskip("peft")

from llmbatch.runtime.config import EngineConfig  # noqa: E402
from llmbatch.runtime.engine import Engine  # noqa: E402
from llmbatch.runtime.lora_merge import AdapterError, read_adapter  # noqa: E402
from llmbatch.runtime.request import Request  # noqa: E402
from llmbatch.runtime.sampling_params import SamplingParams  # noqa: E402
from llmbatch.runtime.tp_executor import TPExecutor  # noqa: E402
from tests.runtime.tiny_models import make_model, make_prompts  # noqa: E402

MAX_NEW = 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(hf, path, **lora_kwargs):
    """A random (non-zero) LoRA on every linear layer, saved with peft's save_pretrained."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False,
                     **lora_kwargs)
    model = get_peft_model(hf, cfg)
    with torch.no_grad():                 # large enough to change the greedy tokens
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.mul_(3.0)
    model.save_pretrained(path)
    return model


def hf_greedy(model, prompts):
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            g = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=MAX_NEW, eos_token_id=None, pad_token_id=0)
            outs.append(g[0, len(p):].tolist())
    return outs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("base")
    hf = make_model(base, arch="llama")
    prompts = make_prompts(6, seed=9)
    plain = hf_greedy(hf, prompts)
    adapter = tmp_path_factory.mktemp("adapter")
    merged = make_adapter(hf, adapter).merge_and_unload()
    return str(base), str(adapter), prompts, hf_greedy(merged, prompts), plain


def run(config, tokenizer, prompts, runner=None):
    engine = Engine(config, runner=runner, tokenizer=tokenizer)
    params = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)
    results = {r.request_id: r for r in engine.generate(
        [Request(i, p, params) for i, p in enumerate(prompts)])}
    return [results[i].output_token_ids for i in range(len(prompts))]


def test_merged_adapter_equals_peft(setup, tokenizer):
    base, adapter, prompts, want, plain = setup
    assert want != plain                               # the adapter changes the outputs
    cfg = EngineConfig(model=base, device="cpu", dtype="float32", lora=adapter)
    assert run(cfg, tokenizer, prompts) == want


def test_merged_adapter_at_tp2_equals_peft(setup, tokenizer):
    base, adapter, prompts, want, _ = setup
    cfg = EngineConfig(model=base, device="cpu", dtype="float32", lora=adapter,
                       tensor_parallel_size=2)
    executor = TPExecutor(cfg, timeout_s=60)
    try:
        assert run(cfg, tokenizer, prompts, runner=executor) == want
    finally:
        executor.shutdown()


def _edit_config(adapter, tmp_path, **changes):
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(adapter, copy)
    cfg = json.loads((copy / "adapter_config.json").read_text())
    cfg.update(changes)
    (copy / "adapter_config.json").write_text(json.dumps(cfg))
    return str(copy)


@pytest.mark.parametrize("changes, message", [
    (dict(use_dora=True), "uses DoRA, which llmbatch does not merge"),
    (dict(modules_to_save=["lm_head"]), "uses modules_to_save (full copies of layers), which"),
    (dict(bias="all"), "trains biases (bias: 'all'), which llmbatch does not merge"),
    (dict(peft_type="IA3"), "peft_type 'IA3'; only LORA adapters can be merged"),
])
def test_unsupported_adapters_are_refused(setup, tmp_path, changes, message):
    _, adapter, _, _, _ = setup
    with pytest.raises(AdapterError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_adapter(_edit_config(adapter, tmp_path, **changes))


def test_an_adapter_of_another_model_is_refused(setup, tmp_path, tokenizer):
    _, adapter, prompts, _, _ = setup
    other = tmp_path / "other"
    make_model(other, arch="llama", layers=1)             # no layer 1: targets are missing
    cfg = EngineConfig(model=str(other), device="cpu", dtype="float32", lora=adapter)
    with pytest.raises(AdapterError, match=r"targets model\.layers\.1\.\S+ and 6 more, which "
                                           r"the checkpoint does not have"):
        Engine(cfg, tokenizer=tokenizer)
    with pytest.raises(AdapterError, match="is not a directory"):
        read_adapter(os.path.join(str(tmp_path), "missing"))
