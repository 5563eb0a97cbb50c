"""Benchmark model shapes and a random-initialised checkpoint every system loads from disk.

The 1B shape is Llama-3.2-1B's (BENCH.md): random weights, since weights do not change the cost
of a step. llmbatch and the transformers peers load the SAME checkpoint directory, so they run the
same weights. The tiny shape exists only so the whole harness runs on a CPU in seconds.

Tokenizer: the workloads are token ids, but the engine loads a tokenizer from the model dir to
detokenize outputs. We save a word-level tokenizer covering the WHOLE vocabulary (id i <-> "t{i}",
ids < 100 are "<i>", with <0> bos, <1> eos, <2> unk, <3> pad), so every id a random model samples
decodes; it is built in ~0.1 s and is ~3 MB for vocab 128256. It is not a real text tokenizer.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

MARKER = "bench_shape.json"     # written last: a dir with it is a complete checkpoint


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        """Parameter count of a tied LlamaForCausalLM (the lm head shares the embedding)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * (self.num_attention_heads * d) * 2 + h * (self.num_key_value_heads * d) * 2
        mlp = 3 * h * i
        per_layer = attn + mlp + 2 * h                  # + two RMSNorm weights
        head = 0 if self.tie_word_embeddings else self.num_embedding_params
        return self.num_embedding_params + self.num_hidden_layers * per_layer + h + head

    @property
    def num_non_embedding_params(self) -> int:
        return self.num_params - self.num_embedding_params

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V of one token over all layers: layers x 2 x kv_heads x head_dim x bytes."""
        return self.num_hidden_layers * 2 * self.num_key_value_heads * self.head_dim * dtype_bytes

    def hf_config(self):
        from transformers import LlamaConfig

        return LlamaConfig(
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
            vocab_size=self.vocab_size,
            # transformers 5.x form (5.17 and 5.24); the legacy rope_theta kwarg is BC-only.
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings, rms_norm_eps=1e-5,
            hidden_act="silu", bos_token_id=0, eos_token_id=1, pad_token_id=3)


# Llama-3.2-1B: 1,235,814,400 parameters (2.47 GB in bf16), KV 32 KiB per token in bf16.
# Its llama3 rope scaling is left out: it changes no cost and our contexts stay < 8k.
SHAPE_1B = ModelShape("1b", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      rope_theta=500000.0, max_position_embeddings=4096)
# CPU smoke test only (BENCH.md: hidden 64, 2 layers).
SHAPE_TINY = ModelShape("tiny", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=1024,
                        rope_theta=500000.0, max_position_embeddings=4096)
SHAPES = {s.name: s for s in (SHAPE_1B, SHAPE_TINY)}


def get_shape(name: str) -> ModelShape:
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
    return SHAPES[name]


def save_tokenizer(vocab_size: int, out_dir: str) -> None:
    """Word-level tokenizer over the whole vocab (see module doc)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if vocab_size <= 100:
        raise ValueError(f"vocab_size must be > 100 (ids < 100 are specials), got {vocab_size}")
    vocab = {(f"<{i}>" if i < 100 else f"t{i}"): i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<2>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<0>", eos_token="<1>",
                                   unk_token="<2>", pad_token="<3>")
    fast.save_pretrained(out_dir)


def make_checkpoint(shape: ModelShape, out_dir: str, dtype: str = "bfloat16",
                    device: str = "cpu", seed: int = 0) -> str:
    """Write a random-initialised LlamaForCausalLM (safetensors) + tokenizer to out_dir.

    Reuses out_dir when it already holds a complete checkpoint of the same shape and dtype.
    Weights are drawn on `device` (the GPU makes the 1.2B init take a second, not a minute):
    every matrix ~ N(0, 0.02), norms 1, as transformers' own init does.
    """
    import torch
    from transformers import LlamaForCausalLM

    wanted = {"shape": asdict(shape), "dtype": dtype, "seed": seed}
    marker = os.path.join(out_dir, MARKER)
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == wanted:
                return out_dir
    os.makedirs(out_dir, exist_ok=True)
    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(shape.hf_config()).to(torch_dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    n = sum(p.numel() for p in model.parameters())
    if n != shape.num_params:
        raise RuntimeError(f"shape {shape.name}: built {n} params, expected {shape.num_params}")
    model.generation_config.eos_token_id = None     # benchmarks ignore EOS
    model.save_pretrained(out_dir, safe_serialization=True)
    save_tokenizer(shape.vocab_size, out_dir)
    del model
    with open(marker, "w") as f:
        json.dump(wanted, f)
    return out_dir
