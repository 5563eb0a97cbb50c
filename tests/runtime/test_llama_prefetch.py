"""models/llama_prefetch.py: which weights a small step touches into L2, in which order, and
that the touch changes nothing the model computes (logits and the KV written are bit-equal with
it on and off). Tiny float32 models on CPU; the touch kernel under the Triton interpreter."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from llmbatch.runtime.layers import l2_prefetch as lp  # noqa: E402
from llmbatch.runtime.models import llama_prefetch  # noqa: E402
from tests.runtime.test_models import (load_ours, make_hf_model, make_kv_caches,  # noqa: E402
                                       random_block_tables, run_step)

CASES = ("llama-gqa-hd32-tied-llama3", "qwen3-gqa-hd128-bias")


class RecordingPrefetcher:
    """Stands in for L2Prefetcher: records what is issued and when the stream is joined."""

    def __init__(self):
        self.events = []

    def issue(self, words):
        self.events.append(("issue", words.data_ptr()))

    def join(self):
        self.events.append(("join",))


@pytest.fixture(params=CASES)
def model(request, tmp_path):
    return load_ours(make_hf_model(request.param, tmp_path, num_hidden_layers=3), tmp_path)


def _expected_issues(model):
    out = []
    for layer in model.model.layers:
        attn = layer.self_attn
        out += [("issue", attn.qkv_proj.weight.data_ptr()),
                ("issue", attn.o_proj.weight.data_ptr())]
    return out


def test_small_step_touches_qkv_and_o_proj_of_every_layer_in_order(model):
    rec = RecordingPrefetcher()
    assert llama_prefetch.enable_l2_prefetch(model, torch.device("cpu"), prefetcher=rec) == 6
    table = random_block_tables(1, 32, seed=1)[0]
    run_step(model, make_kv_caches(model), [(list(range(16)), table, 0, 16)])
    assert rec.events == _expected_issues(model) + [("join",)]


def test_step_of_17_tokens_touches_nothing(model):
    rec = RecordingPrefetcher()
    llama_prefetch.enable_l2_prefetch(model, torch.device("cpu"), prefetcher=rec)
    table = random_block_tables(1, 32, seed=2)[0]
    run_step(model, make_kv_caches(model), [(list(range(17)), table, 0, 17)])
    assert rec.events == [("join",)]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the touch kernel on CPU tensors needs TRITON_INTERPRET=1")
def test_logits_and_kv_are_bit_equal_with_the_real_touch(model):
    """A prefill of 12 tokens, then a 2-sequence decode step and a 5-token span: every step
    small enough to touch. Same bits with the touch on (inline on CPU) and off."""
    tables = random_block_tables(2, 32, seed=3)
    seqs = [[(5 * i + s) % 300 for i in range(20)] for s in range(2)]
    steps = [[(seqs[0], tables[0], 0, 12), (seqs[1], tables[1], 0, 3)],
             [(seqs[0], tables[0], 12, 13), (seqs[1], tables[1], 3, 4)],
             [(seqs[1], tables[1], 4, 9)]]
    results = []
    for on in (False, True):
        if on:
            assert llama_prefetch.enable_l2_prefetch(model, torch.device("cpu")) == 6
        kv = make_kv_caches(model)
        results.append(([run_step(model, kv, spans) for spans in steps], kv))
    flags = model.model.l2_prefetcher.flags
    llama_prefetch.disable_l2_prefetch(model)
    (off, kv_off), (on, kv_on) = results
    for a, b in zip(off, on):
        assert torch.equal(a, b)
    for (k0, v0), (k1, v1) in zip(kv_off, kv_on):
        assert torch.equal(k0.nan_to_num(7.0), k1.nan_to_num(7.0))
        assert torch.equal(v0.nan_to_num(7.0), v1.nan_to_num(7.0))
    assert flags.dtype == torch.int32 and int(flags.max()) <= 1   # flags only, never read


def test_quantized_layers_are_not_touched_and_disable_removes_every_hook(model):
    model.model.layers[1].self_attn.o_proj.quant_method = object()   # e.g. an int8 layer
    model.model.layers[2].self_attn.qkv_proj.quant_method = object()
    rec = RecordingPrefetcher()
    assert llama_prefetch.enable_l2_prefetch(model, torch.device("cpu"), prefetcher=rec) == 4
    layers = model.model.layers
    assert layers[1].self_attn.l2_prefetch is None and layers[1].mlp.l2_prefetch is None
    assert layers[0].mlp.l2_prefetch.names == ["layers.1.qkv_proj"]
    assert layers[2].mlp.l2_prefetch is None   # the last layer has no next qkv
    llama_prefetch.disable_l2_prefetch(model)
    hooks = [model.model.l2_prefetch, model.model.l2_prefetcher]
    for layer in layers:
        hooks += [layer.self_attn.l2_prefetch, layer.mlp.l2_prefetch]
    assert hooks == [None] * len(hooks)


def test_plans_choose_the_weights_and_gate_up_prefix(model):
    """o_proj alone; the default plus the first 0.01 MiB of gate_up (after o_proj, same hook);
    nothing at all (no prefetcher kept). Re-enabling replaces the earlier hooks."""
    Plan = llama_prefetch.PrefetchPlan
    rec = RecordingPrefetcher()
    cpu = torch.device("cpu")
    assert llama_prefetch.enable_l2_prefetch(model, cpu, rec, Plan(next_qkv=False)) == 3
    layers = model.model.layers
    assert model.model.l2_prefetch is None and layers[0].mlp.l2_prefetch is None
    assert layers[2].self_attn.l2_prefetch.names == ["layers.2.o_proj"]
    plan = Plan(gate_up_mib=0.01)
    assert plan.label == "o_proj+next_qkv+gate_up 0.01 MiB"
    assert llama_prefetch.enable_l2_prefetch(model, cpu, rec, plan) == 9
    hook = layers[1].self_attn.l2_prefetch
    assert hook.names == ["layers.1.o_proj", "layers.1.gate_up_proj[:0.01 MiB]"]
    gate_up = layers[1].mlp.gate_up_proj.weight
    assert hook.words[1].numel() == int(0.01 * (1 << 20)) // 4 < gate_up.numel()
    assert hook.words[1].data_ptr() == gate_up.data_ptr()
    nothing = Plan(o_proj=False, next_qkv=False)
    assert nothing.label == "nothing"
    assert llama_prefetch.enable_l2_prefetch(model, cpu, rec, nothing) == 0
    assert model.model.l2_prefetcher is None and layers[1].self_attn.l2_prefetch is None


def test_hook_threshold_is_max_tokens():
    rec = RecordingPrefetcher()
    words = torch.zeros(4, dtype=torch.int32)
    hook = llama_prefetch.PrefetchHook(rec, [words], ["w"])
    hook(llama_prefetch.MAX_TOKENS)
    hook(llama_prefetch.MAX_TOKENS + 1)
    hook(1)
    assert rec.events == [("issue", words.data_ptr())] * 2
    assert lp.prefetch_words(torch.zeros(2, 2)) is not None   # float32 weights qualify too
