"""Native Llama-family decoder: Llama, Mistral, Qwen2 and Qwen3 in one implementation.

The variants differ only in small switches read from the transformers config (`LlamaSpec`):
    Qwen2:   bias on q/k/v (not on o_proj)
    Qwen3:   per-head RMSNorm of q and k before rotary; explicit head_dim; attention_bias flag
    Mistral: a sliding window, which we do not implement: refused when the context is longer
    Llama:   attention_bias / mlp_bias flags, llama3 rope scaling
Module and parameter names mirror transformers' (model.layers.N.self_attn...), except that
q/k/v and gate/up are fused; `packed_modules_mapping` tells the loader how to fill them.

Forward contract (docs/runtime.md): the step's tokens arrive flattened, one span per request;
attention reads/writes the paged KV cache through the attention backend, so prefill, chunked
prefill, prefix hits and decode are the same code path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from llmbatch.runtime.attention.backend import AttentionBackend, AttentionMetadata
from llmbatch.runtime.layers.activation import SiluAndMul
from llmbatch.runtime.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from llmbatch.runtime.layers.linear import (MergedColumnParallelLinear, QKVParallelLinear,
                                            RowParallelLinear, divide)
from llmbatch.runtime.layers.norm import RMSNorm
from llmbatch.runtime.layers.rotary import RotaryEmbedding, rope_params_from_config

VARIANTS = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class LlamaSpec:
    """Everything the model reads from a transformers config, validated once."""

    variant: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Optional[dict]
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    sliding_window: Optional[int]  # None = full attention

    @classmethod
    def from_config(cls, config, variant: str) -> "LlamaSpec":
        if variant not in VARIANTS:
            raise ValueError(f"unknown Llama-family variant {variant!r}; one of {', '.join(VARIANTS)}")
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act={act!r} is not supported; Llama-family models use 'silu'")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"):
            value = getattr(config, key, None)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"config {key}={value!r}: expected a positive integer")
        hidden, num_heads = config.hidden_size, config.num_attention_heads
        head_dim = getattr(config, "head_dim", None)
        if not head_dim:
            if hidden % num_heads:
                raise ValueError(f"hidden_size={hidden} is not divisible by "
                                 f"num_attention_heads={num_heads} and the config has no head_dim")
            head_dim = hidden // num_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) \
                or num_kv_heads < 1:
            raise ValueError(f"config num_key_value_heads={num_kv_heads!r}: expected a "
                             f"positive integer")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_attention_heads={num_heads} is not a multiple of "
                             f"num_key_value_heads={num_kv_heads}")
        attention_bias = bool(getattr(config, "attention_bias", False))
        rope_theta, rope_scaling = rope_params_from_config(config)
        return cls(
            variant=variant,
            vocab_size=config.vocab_size,
            hidden_size=hidden,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(getattr(config, "rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            # Qwen2 always has q/k/v bias and never an o_proj bias.
            qkv_bias=attention_bias or variant == "qwen2",
            o_bias=attention_bias and variant != "qwen2",
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            qk_norm=variant == "qwen3",
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            sliding_window=effective_sliding_window(config),
        )


def effective_sliding_window(config) -> Optional[int]:
    """The window a config actually applies, or None. Mistral applies `sliding_window` when set;
    Qwen2/3 only with use_sliding_window (newer configs spell it out in layer_types)."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return int(window) if "sliding_attention" in layer_types else None
    if not getattr(config, "use_sliding_window", True):
        return None
    return int(window)


class LlamaAttention(nn.Module):
    # Set by runtime/kernel_paths.py (EngineConfig.fused_kernels, CUDA only): rotary as one
    # Triton kernel.
    use_fused_rotary: bool = False
    # Set by models/llama_prefetch.py (EngineConfig.l2_prefetch): touches o_proj's weight into
    # L2 while rotary and attention run (small steps only).
    l2_prefetch = None

    def __init__(self, spec: LlamaSpec, params_dtype: torch.dtype, tp_rank: int,
                 tp_size: int) -> None:
        super().__init__()
        self.head_dim = spec.head_dim
        self.qkv_proj = QKVParallelLinear(spec.hidden_size, spec.head_dim, spec.num_heads,
                                          spec.num_kv_heads, bias=spec.qkv_bias,
                                          params_dtype=params_dtype, tp_rank=tp_rank,
                                          tp_size=tp_size)
        self.num_heads = self.qkv_proj.num_heads         # this rank's query heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads   # this rank's KV heads
        self.o_proj = RowParallelLinear(spec.num_heads * spec.head_dim, spec.hidden_size,
                                        bias=spec.o_bias, params_dtype=params_dtype,
                                        tp_rank=tp_rank, tp_size=tp_size)
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, params_dtype)
            self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, params_dtype)
        else:
            self.q_norm = self.k_norm = None
        self.scale = spec.head_dim ** -0.5

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], hidden: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, attn_meta: AttentionMetadata,
                attn_backend: AttentionBackend) -> torch.Tensor:
        """hidden (num_tokens, hidden_size) -> (num_tokens, hidden_size); rope = (cos, sin) of
        the tokens' positions, each (num_tokens, 1, head_dim/2), shared by all layers."""
        qkv = self.qkv_proj(hidden)
        if self.l2_prefetch is not None:
            self.l2_prefetch(hidden.shape[0])
        out = self.attend(rope, qkv, k_cache, v_cache, attn_meta, attn_backend)
        return self.o_proj(out)

    def attend(self, rope, qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               attn_meta: AttentionMetadata, attn_backend: AttentionBackend) -> torch.Tensor:
        """qkv (num_tokens, q_size + 2 * kv_size), the qkv_proj output -> attention output
        (num_tokens, num_heads * head_dim), before o_proj; writes k/v into the paged cache."""
        q, k, v = self.qkv_proj.split(qkv)
        q = q.view(-1, self.num_heads, self.head_dim)        # (num_tokens, num_heads, head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)     # (num_tokens, num_kv_heads, head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        fits = getattr(attn_backend, "rotary_in_attention_fits", None)
        if self.use_fused_rotary and fits is not None and fits(attn_meta, self.num_heads,
                                                               self.num_kv_heads):
            # Decode and speculative verify (spans of <= 8 tokens, each one query tile):
            # rotary, the K/V store and attention in one launch
            # (EngineConfig.rotary_in_attention; only the triton backend has `fits`, and it
            # says no unless that flag is set).
            out = attn_backend.forward_rotary_decode(q, k, v, cos, sin, k_cache, v_cache,
                                                     attn_meta, self.scale)
            return out.reshape(-1, self.num_heads * self.head_dim)
        if self.use_fused_rotary and attn_backend.name == "triton":
            # One launch rotates q and stores the rotated k and v into the paged cache (the
            # backend's write_kv, fused in: 16 fewer launches a decode step on the 1B shape).
            from llmbatch.runtime.layers.fused_rotary import fused_rotary_store_kv

            q = fused_rotary_store_kv(q, k, v, cos, sin, k_cache, v_cache,
                                      attn_meta.slot_mapping)
        else:
            if self.use_fused_rotary:
                from llmbatch.runtime.layers.fused_rotary import fused_rotary

                q, k = fused_rotary(q, k, cos, sin)
            else:
                q, k = RotaryEmbedding.rotate(q, cos, sin), RotaryEmbedding.rotate(k, cos, sin)
            attn_backend.write_kv(k, v, k_cache, v_cache, attn_meta.slot_mapping)
        out = attn_backend.forward(q, k_cache, v_cache, attn_meta, self.scale)
        return out.reshape(-1, self.num_heads * self.head_dim)



def fused_rotary_on(model) -> bool:
    """Whether the model's attention layers use the fused rotary (kernel_paths sets it for
    fused_kernels on CUDA): what rotary_in_attention rides on (ModelRunner, bench_batch1)."""
    return any(m.use_fused_rotary for m in model.modules() if isinstance(m, LlamaAttention))

class LlamaMLP(nn.Module):
    # Set by models/llama_prefetch.py: touches the next layer's qkv weight into L2 while
    # SiLU·mul and down_proj run (small steps only).
    l2_prefetch = None

    def __init__(self, spec: LlamaSpec, params_dtype: torch.dtype, tp_rank: int,
                 tp_size: int) -> None:
        super().__init__()
        divide(spec.intermediate_size, tp_size, "intermediate_size")   # (named before a layer's)
        self.gate_up_proj = MergedColumnParallelLinear(
            spec.hidden_size, [spec.intermediate_size] * 2, bias=spec.mlp_bias,
            params_dtype=params_dtype, tp_rank=tp_rank, tp_size=tp_size)
        self.act_fn = SiluAndMul()
        self.down_proj = RowParallelLinear(spec.intermediate_size, spec.hidden_size,
                                           bias=spec.mlp_bias, params_dtype=params_dtype,
                                           tp_rank=tp_rank, tp_size=tp_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.l2_prefetch is not None:
            self.l2_prefetch(x.shape[0])
        return self.down_proj(self.act_fn(gate_up))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, spec: LlamaSpec, params_dtype: torch.dtype, tp_rank: int,
                 tp_size: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(spec, params_dtype, tp_rank, tp_size)
        self.mlp = LlamaMLP(spec, params_dtype, tp_rank, tp_size)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, params_dtype)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, params_dtype)

    def forward(self, rope, hidden, residual, k_cache, v_cache, attn_meta, attn_backend):
        """Pre-norm block. `residual` is the running sum of the block outputs (None before the
        first layer); it is added inside the norms, so `hidden` here is the last block's output."""
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(rope, hidden, k_cache, v_cache, attn_meta, attn_backend)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    # Set by runtime/kernel_paths.py (EngineConfig.skinny_matmul / skinny_gemv): small steps run
    # the fused layers of models/llama_skinny.py.
    use_skinny_matmul: bool = False
    # Largest step (tokens) that takes the skinny path: 16 with skinny_matmul, 1 when only
    # EngineConfig.skinny_gemv is on (llama_skinny.enable_skinny_matmul sets it).
    skinny_max_tokens: int = 16
    # Set by models/llama_prefetch.py (EngineConfig.l2_prefetch; never with skinny_matmul):
    # the hook touching layer 0's qkv weight, and the side stream's owner, joined at the end.
    l2_prefetch = None
    l2_prefetcher = None

    def __init__(self, spec: LlamaSpec, params_dtype: torch.dtype, tp_rank: int,
                 tp_size: int) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(spec.vocab_size, spec.hidden_size,
                                                   params_dtype, tp_rank, tp_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(spec, params_dtype, tp_rank, tp_size) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, params_dtype)
        # One rotary for all layers: cos/sin are computed once per step, not once per layer.
        self.rotary_emb = RotaryEmbedding(spec.head_dim, spec.rope_theta, spec.rope_scaling)

    def forward(self, input_ids, positions, kv_caches, attn_meta, attn_backend) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # (num_tokens, hidden_size)
        rope = self.rotary_emb.cos_sin(positions, hidden.dtype)
        if self.use_skinny_matmul:
            from llmbatch.runtime.models import llama_skinny

            if llama_skinny.skinny_applies(self, hidden):
                return llama_skinny.skinny_model_forward(self, hidden, rope, kv_caches,
                                                         attn_meta, attn_backend)
        if self.l2_prefetch is not None:
            self.l2_prefetch(hidden.shape[0])
        residual = None
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            hidden, residual = layer(rope, hidden, residual, k_cache, v_cache, attn_meta,
                                     attn_backend)
        hidden, _ = self.norm(hidden, residual)
        if self.l2_prefetcher is not None:
            self.l2_prefetcher.join()
        return hidden


class LlamaForCausalLM(nn.Module):
    # checkpoint module name -> (our fused module, shard id for its weight_loader)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config, variant: str = "llama", params_dtype: Optional[torch.dtype] = None,
                 tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        self.config = config
        self.spec = spec = LlamaSpec.from_config(config, variant)
        params_dtype = params_dtype or torch.get_default_dtype()
        self.model = LlamaModel(spec, params_dtype, tp_rank, tp_size)
        self.lm_head = ParallelLMHead(
            spec.vocab_size, spec.hidden_size, params_dtype, tp_rank, tp_size,
            tied_embedding=self.model.embed_tokens if spec.tie_word_embeddings else None)
        attn = self.model.layers[0].self_attn if spec.num_layers else None
        self.num_layers = spec.num_layers
        self.head_dim = spec.head_dim
        self.num_kv_heads_per_rank = attn.num_kv_heads if attn else spec.num_kv_heads
        self.sliding_window = spec.sliding_window

    def check_context_len(self, max_seq_len: int) -> None:
        """Refuse contexts our full attention would compute differently from the model."""
        if self.sliding_window is not None and max_seq_len > self.sliding_window:
            raise ValueError(
                f"sequence length {max_seq_len} exceeds the model's sliding_window="
                f"{self.sliding_window}, which is not implemented; use max_model_len <= "
                f"{self.sliding_window}")

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], attn_meta: AttentionMetadata,
                attn_backend: AttentionBackend) -> torch.Tensor:
        """input_ids, positions: (num_tokens,) int64 -> hidden (num_tokens, hidden_size)."""
        if len(kv_caches) != self.num_layers:
            raise ValueError(f"got {len(kv_caches)} KV caches for {self.num_layers} layers")
        self.check_context_len(attn_meta.max_seq_len)
        return self.model(input_ids, positions, kv_caches, attn_meta, attn_backend)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(num_samples, hidden_size) -> (num_samples, vocab_size) float32."""
        return self.lm_head(hidden)

    def skip_checkpoint_tensor(self, name: str) -> bool:
        """Checkpoint tensors with no parameter here, on purpose."""
        if name.endswith("rotary_emb.inv_freq"):  # old checkpoints saved the rope buffer
            return True
        # A tied checkpoint may still carry a copy of the embedding as lm_head.
        return self.spec.tie_word_embeddings and name == "lm_head.weight"
