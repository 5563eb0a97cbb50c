"""Native Llama-family models against transformers: same weights, same logits.

Each case saves a tiny random transformers model (float32), builds ours with build_model, loads
the checkpoint with load_weights, runs the step through the paged KV cache with the torch
attention backend (hand-made AttentionMetadata, shuffled non-contiguous block tables) and
compares logits at every position with transformers' full forward."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

from llmbatch.runtime.attention.backend import AttentionMetadata
from llmbatch.runtime.attention.torch_backend import TorchAttentionBackend
from llmbatch.runtime.loader import ModelNotFoundError, load_weights, resolve_model_path
from llmbatch.runtime.models import build_model
from llmbatch.runtime.models.llama import effective_sliding_window

BLOCK_SIZE = 16
NUM_BLOCKS = 24
ATOL = 1e-4

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

# name: (config class, model class, config kwargs). Together: Llama/Mistral/Qwen2/Qwen3, tied and
# untied, GQA and MHA, head_dim 16/32/64/128, biases, q/k norm, llama3 rope scaling.
CASES = {
    "llama-mha-hd16": (tf.LlamaConfig, tf.LlamaForCausalLM,
                       dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4)),
    "llama-gqa-hd32-tied-llama3": (tf.LlamaConfig, tf.LlamaForCausalLM,
                                   dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                        head_dim=32, tie_word_embeddings=True,
                                        rope_scaling=LLAMA3_ROPE, rope_theta=500000.0)),
    "mistral-gqa-hd64-window": (tf.MistralConfig, tf.MistralForCausalLM,
                                dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                                     head_dim=64, sliding_window=256)),
    "qwen2-gqa-hd32-tied": (tf.Qwen2Config, tf.Qwen2ForCausalLM,
                            dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                                 tie_word_embeddings=True)),
    "qwen3-gqa-hd128-bias": (tf.Qwen3Config, tf.Qwen3ForCausalLM,
                             dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                  head_dim=128, attention_bias=True)),
    "qwen3-mha-hd16-tied": (tf.Qwen3Config, tf.Qwen3ForCausalLM,
                            dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                                 head_dim=16, tie_word_embeddings=True)),
}


def make_hf_model(case: str, path=None, seed: int = 0, **overrides):
    config_cls, model_cls, kwargs = CASES[case]
    kwargs = dict(vocab_size=320, intermediate_size=96, num_hidden_layers=2,
                  max_position_embeddings=512, **kwargs)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).float().eval()
    # Non-default values everywhere (biases, norm weights too), so a parameter that is loaded
    # into the wrong place or not at all changes the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1 if p.dim() == 2 else 0.05)
    if path is not None:
        model.save_pretrained(path)
    return model


def load_ours(hf_model, path, dtype=torch.float32):
    model = build_model(hf_model.config, dtype, "cpu")
    load_weights(model, str(path))
    return model


def make_kv_caches(model, dtype=torch.float32):
    shape = (NUM_BLOCKS, BLOCK_SIZE, model.num_kv_heads_per_rank, model.head_dim)
    return [(torch.full(shape, float("nan"), dtype=dtype), torch.full(shape, float("nan"), dtype=dtype))
            for _ in range(model.num_layers)]


def random_block_tables(num_seqs: int, max_tokens: int, seed: int) -> list[list[int]]:
    """Disjoint, shuffled (non-contiguous, out of order) physical blocks per sequence."""
    per_seq = -(-max_tokens // BLOCK_SIZE)
    blocks = list(range(NUM_BLOCKS))
    random.Random(seed).shuffle(blocks)
    assert num_seqs * per_seq <= NUM_BLOCKS
    return [blocks[i * per_seq:(i + 1) * per_seq] for i in range(num_seqs)]


def run_step(model, kv_caches, spans, dtype=torch.float32):
    """spans: list of (tokens, block_table, start, end): compute tokens[start:end] of a sequence
    whose tokens[:start] are already in the cache. Returns float32 logits of every new token."""
    input_ids, positions, slots, starts, seq_lens = [], [], [], [0], []
    width = max(len(bt) for _, bt, _, _ in spans)
    for tokens, block_table, start, end in spans:
        for pos in range(start, end):
            input_ids.append(tokens[pos])
            positions.append(pos)
            slots.append(block_table[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE)
        starts.append(starts[-1] + end - start)
        seq_lens.append(end)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor([bt + [0] * (width - len(bt)) for _, bt, _, _ in spans],
                                  dtype=torch.int32),
        max_query_len=max(e - s for _, _, s, e in spans),
        max_seq_len=max(seq_lens))
    with torch.no_grad():
        hidden = model(torch.tensor(input_ids), torch.tensor(positions), kv_caches, meta,
                       TorchAttentionBackend())
        assert hidden.shape == (len(input_ids), model.config.hidden_size)
        logits = model.compute_logits(hidden)
    assert logits.dtype == torch.float32
    return logits


def hf_logits(hf_model, tokens):
    with torch.no_grad():
        return hf_model(torch.tensor([tokens])).logits[0].float()


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_batch_matches_transformers(case, tmp_path):
    hf = make_hf_model(case, tmp_path)
    ours = load_ours(hf, tmp_path)
    rng = random.Random(1)
    lengths = [1, 5, 16, 17, 40]  # within a block, exactly one block, one past, several blocks
    prompts = [[rng.randrange(320) for _ in range(n)] for n in lengths]
    tables = random_block_tables(len(prompts), max(lengths), seed=2)
    logits = run_step(ours, make_kv_caches(ours),
                      [(p, bt, 0, len(p)) for p, bt in zip(prompts, tables)])
    assert logits.shape == (sum(lengths), 320)
    for row, prompt in zip(logits.split(lengths), prompts):
        torch.testing.assert_close(row, hf_logits(hf, prompt), atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", ["llama-gqa-hd32-tied-llama3", "qwen3-gqa-hd128-bias",
                                  "qwen2-gqa-hd32-tied"])
def test_chunked_prefill_then_decode_matches_full_forward(case, tmp_path):
    """Step 1: A prefills 21 of its tokens, B its whole prompt. Step 2: A the rest of its prompt
    while B decodes. Steps 3-4: both decode. Every logit equals the full forward's."""
    hf = make_hf_model(case, tmp_path, seed=3)
    ours = load_ours(hf, tmp_path)
    rng = random.Random(4)
    seq_a = [rng.randrange(320) for _ in range(43)]  # 40-token prompt + 3 decoded tokens
    seq_b = [rng.randrange(320) for _ in range(12)]  # 9-token prompt + 3 decoded tokens
    table_a, table_b = random_block_tables(2, 43, seed=5)
    kv = make_kv_caches(ours)
    ref_a, ref_b = hf_logits(hf, seq_a), hf_logits(hf, seq_b)
    steps = [((0, 21), (0, 9)), ((21, 40), (9, 10)), ((40, 41), (10, 11)), ((41, 42), (11, 12))]
    for (a0, a1), (b0, b1) in steps:
        logits = run_step(ours, kv, [(seq_a, table_a, a0, a1), (seq_b, table_b, b0, b1)])
        torch.testing.assert_close(logits[:a1 - a0], ref_a[a0:a1], atol=ATOL, rtol=0)
        torch.testing.assert_close(logits[a1 - a0:], ref_b[b0:b1], atol=ATOL, rtol=0)


def test_model_shape_attributes_and_tied_weights(tmp_path):
    hf = make_hf_model("qwen3-gqa-hd128-bias", tmp_path)
    ours = load_ours(hf, tmp_path)
    assert (ours.num_layers, ours.num_kv_heads_per_rank, ours.head_dim) == (2, 2, 128)
    assert ours.lm_head.weight is not ours.model.embed_tokens.weight
    tied = build_model(make_hf_model("qwen2-gqa-hd32-tied").config, torch.float32, "cpu")
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert (tied.num_kv_heads_per_rank, tied.head_dim) == (2, 32)


def test_bfloat16_model_runs_close_to_float32(tmp_path):
    hf = make_hf_model("llama-mha-hd16", tmp_path)
    ours = load_ours(hf, tmp_path, dtype="bfloat16")
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    prompt = list(range(3, 30))
    table = random_block_tables(1, len(prompt), seed=0)[0]
    logits = run_step(ours, make_kv_caches(ours, torch.bfloat16), [(prompt, table, 0, len(prompt))])
    ref = hf_logits(hf, prompt)
    assert logits.dtype == torch.float32
    assert (logits - ref).abs().max().item() < 0.1 * ref.abs().max().item()


def test_sliding_window_shorter_than_context_is_refused(tmp_path):
    hf = make_hf_model("mistral-gqa-hd64-window", tmp_path, sliding_window=16)
    ours = load_ours(hf, tmp_path)
    assert ours.sliding_window == 16
    table = random_block_tables(1, 17, seed=0)[0]
    run_step(ours, make_kv_caches(ours), [(list(range(16)), table, 0, 16)])  # 16 tokens: fine
    with pytest.raises(ValueError, match="exceeds the model's sliding_window=16"):
        run_step(ours, make_kv_caches(ours), [(list(range(17)), table, 0, 17)])


def test_effective_sliding_window_reads_each_config_style():
    assert effective_sliding_window(tf.MistralConfig(sliding_window=4096)) == 4096
    assert effective_sliding_window(tf.MistralConfig(sliding_window=None)) is None
    assert effective_sliding_window(tf.Qwen2Config(sliding_window=4096)) is None  # not in use
    assert effective_sliding_window(tf.LlamaConfig()) is None


def test_unsupported_architecture_is_a_one_line_error():
    config = tf.LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1)
    config.architectures = ["GPT2LMHeadModel"]
    with pytest.raises(ValueError) as err:
        build_model(config, torch.float32, "cpu")
    msg = str(err.value)
    assert "\n" not in msg and "GPT2LMHeadModel" in msg
    assert "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM" in msg
    with pytest.raises(ValueError, match="hidden_act='gelu' is not supported"):
        build_model(tf.LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1,
                                   hidden_act="gelu"), torch.float32, "cpu")
    with pytest.raises(ValueError, match="rope type 'yarn' is not supported"):
        build_model(tf.LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1,
                                   rope_scaling={"rope_type": "yarn", "factor": 2.0}),
                    torch.float32, "cpu")
    with pytest.raises(ValueError, match="unsupported model dtype 'float64'"):
        build_model(tf.LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1),
                    "float64", "cpu")


def _params(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_sharded_safetensors_and_bin_checkpoints_load_the_same(tmp_path):
    hf = make_hf_model("qwen2-gqa-hd32-tied", tmp_path / "single")
    reference = _params(load_ours(hf, tmp_path / "single"))
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    # A stray file the index does not list must not be read.
    save_file({"junk": torch.zeros(1)}, str(tmp_path / "sharded" / "zzz-extra.safetensors"))
    bin_dir = tmp_path / "bin"
    hf.config.save_pretrained(bin_dir)
    torch.save(load_file(str(tmp_path / "single" / "model.safetensors")),
               bin_dir / "pytorch_model.bin")
    for other in ("sharded", "bin"):
        loaded = _params(load_ours(hf, tmp_path / other))
        assert loaded.keys() == reference.keys()
        for name in reference:
            assert torch.equal(loaded[name], reference[name]), (other, name)


def _rewrite_checkpoint(path, edit):
    file = str(path / "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_loader_errors(tmp_path):
    hf = make_hf_model("llama-mha-hd16", tmp_path)
    # A tensor missing from the checkpoint: named with its fused parameter and shard.
    _rewrite_checkpoint(tmp_path, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match=r"no weights for model\.layers\.1\.self_attn\.qkv_proj\.weight\[k\]"):
        load_ours(hf, tmp_path)
    # A tensor the model does not know.
    _rewrite_checkpoint(tmp_path, lambda t: t.update(
        {"model.layers.1.self_attn.k_proj.weight": torch.zeros(64, 64), "model.extra": torch.zeros(2)}))
    with pytest.raises(ValueError, match="checkpoint tensor 'model.extra' matches no parameter"):
        load_ours(hf, tmp_path)
    # A config that does not match the checkpoint's shapes.
    _rewrite_checkpoint(tmp_path, lambda t: t.pop("model.extra"))
    wrong = tf.LlamaConfig(**{**hf.config.to_dict(), "intermediate_size": 64})
    with pytest.raises(ValueError, match="does not match"):
        load_weights(build_model(wrong, torch.float32, "cpu"), str(tmp_path))
    load_ours(hf, tmp_path)  # the repaired checkpoint loads
    # No weights at all / no directory.
    empty = tmp_path / "empty"
    hf.config.save_pretrained(empty)
    with pytest.raises(FileNotFoundError, match="no weights found"):
        load_ours(hf, empty)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_ours(hf, tmp_path / "nowhere")
    # An index naming a shard that is not there.
    (empty / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="missing shard"):
        load_ours(hf, empty)


def test_resolve_model_path(tmp_path, monkeypatch):
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_path(str(tmp_path / "missing"))
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'.\nCheck your connection.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    # An OSError (the job runner's "cannot load the model", exit 2), not a RuntimeError (an
    # internal error, exit 1): the user named a model this machine cannot get.
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model_path("someorg/some-model")
    assert isinstance(err.value, OSError)
    assert "\n" not in str(err.value)
    assert "'someorg/some-model' is not a local directory" in str(err.value)
    assert "OSError: We couldn't connect" in str(err.value)


def test_quant_method_seam_sees_loaded_rank_weights(tmp_path):
    """The hook a quantizer plugs into: process_weights_after_loading runs once per layer after
    every weight is loaded; apply() replaces the dense matmul."""
    from llmbatch.runtime.layers.linear import LinearBase

    class Recorder:
        def __init__(self):
            self.processed, self.applied = [], 0

        def process_weights_after_loading(self, layer):
            assert not torch.isnan(layer.weight).any()
            self.processed.append(layer)

        def apply(self, layer, x, bias):
            self.applied += 1
            return torch.nn.functional.linear(x, layer.weight, bias)

    hf = make_hf_model("qwen3-gqa-hd128-bias", tmp_path)
    ours = build_model(hf.config, torch.float32, "cpu")
    for module in ours.modules():
        if isinstance(module, LinearBase):
            module.weight.data.fill_(float("nan"))
    linears = [m for m in ours.modules() if isinstance(m, LinearBase)]
    recorder = Recorder()
    for module in linears:
        module.quant_method = recorder
    load_weights(ours, str(tmp_path))
    assert recorder.processed == linears and len(linears) == 2 * 4  # qkv, o, gate_up, down
    prompt = list(range(10))
    logits = run_step(ours, make_kv_caches(ours), [(prompt, [3], 0, 10)])
    assert recorder.applied == len(linears)
    torch.testing.assert_close(logits, hf_logits(hf, prompt), atol=ATOL, rtol=0)
