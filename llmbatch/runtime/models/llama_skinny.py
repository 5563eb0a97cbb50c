"""The Llama-family decode path on skinny matmuls (EngineConfig.skinny_matmul; opt-in).

For steps of at most 16 tokens (batch-1..16 decode, small verify steps) a decoder layer runs as

    qkv     = skinny(residual, W_qkv, norm=input_layernorm)                 1 launch
    attn    = rotary + K/V store + attention (LlamaAttention.attend)         2 launches (triton)
    residual = skinny(attn, W_o, residual epilogue)                          1 launch
    act     = skinny(residual, W_gate_up, norm=post_attention_layernorm, SiLU·mul)   1 launch
    residual = skinny(act, W_down, residual epilogue)                        1 launch

instead of add+norm, qkv, rotary/KV, attention, o_proj, add+norm, gate_up, SiLU·mul, down.

Residual-stream bookkeeping: the unfused layer returns (block output, residual) and the NEXT
norm adds them; here the residual epilogues add each block output at once, so between layers
`residual` is already the full sum and every RMSNorm is a plain norm (a prologue). The rounding
is the same (one add in the model dtype of the rounded matmul output), so only the float32
summation orders differ from the unfused path. The final norm is then model.norm(residual).

Applies at tensor_parallel_size 1 (no all-reduce between the matmul and the residual add) with
dense weights; enable_skinny_matmul checks that once, skinny_applies per step. With
EngineConfig.pdl (sm_90+) it also sets model.skinny_pdl: every skinny launch then uses
programmatic dependent launch (layers/skinny_matmul.py).
"""

from __future__ import annotations

import torch

from llmbatch.runtime.layers import skinny_matmul as sm


def _linears(layer):
    attn, mlp = layer.self_attn, layer.mlp
    return (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)


def enable_skinny_matmul(model, pdl: bool = False) -> bool:
    """Switch the fused path on for every LlamaModel inside `model` whose linear layers are all
    dense and unsharded (tp_size 1, no quant_method); returns True when at least one was.
    pdl: its kernels launch with programmatic dependent launch (EngineConfig.pdl; the caller
    checked for CUDA sm_90+)."""
    from llmbatch.runtime.models.llama import LlamaModel

    enabled = False
    for module in model.modules():
        if not isinstance(module, LlamaModel):
            continue
        ok = all(lin.quant_method is None and lin.tp_size == 1
                 for layer in module.layers for lin in _linears(layer))
        module.use_skinny_matmul = ok
        module.skinny_pdl = ok and pdl
        enabled = enabled or ok
    return enabled


def skinny_applies(model, hidden: torch.Tensor) -> bool:
    """hidden (num_tokens, hidden_size): the step is small enough and the weights match it."""
    if not 1 <= hidden.shape[0] <= sm.MAX_M or not len(model.layers):
        return False
    return sm.skinny_matmul_supported(hidden, model.layers[0].self_attn.qkv_proj.weight)


def skinny_layer_forward(layer, rope, residual: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, attn_meta, attn_backend,
                         pdl: bool = False) -> torch.Tensor:
    """residual (num_tokens, hidden_size): the full residual stream entering the layer ->
    the stream leaving it (same shape). pdl: skinny launches use programmatic dependent
    launch."""
    attn, mlp = layer.self_attn, layer.mlp
    in_norm, post_norm = layer.input_layernorm, layer.post_attention_layernorm
    qkv = sm.skinny_linear(residual, attn.qkv_proj.weight, attn.qkv_proj.bias,
                           norm_weight=in_norm.weight, eps=in_norm.eps, pdl=pdl)
    out = attn.attend(rope, qkv, k_cache, v_cache, attn_meta, attn_backend)
    residual = sm.skinny_linear(out, attn.o_proj.weight, attn.o_proj.bias, residual=residual,
                                pdl=pdl)
    act = sm.skinny_linear(residual, mlp.gate_up_proj.weight, mlp.gate_up_proj.bias,
                           norm_weight=post_norm.weight, eps=post_norm.eps, gate_up=True,
                           pdl=pdl)
    return sm.skinny_linear(act, mlp.down_proj.weight, mlp.down_proj.bias, residual=residual,
                            pdl=pdl)


def skinny_model_forward(model, hidden: torch.Tensor, rope, kv_caches, attn_meta,
                         attn_backend) -> torch.Tensor:
    """LlamaModel.forward after the embedding: hidden (num_tokens, hidden_size) embeddings ->
    final-normed hidden states, like the unfused loop."""
    residual = hidden
    pdl = getattr(model, "skinny_pdl", False)  # set by enable_skinny_matmul
    for layer, (k_cache, v_cache) in zip(model.layers, kv_caches):
        residual = skinny_layer_forward(layer, rope, residual, k_cache, v_cache, attn_meta,
                                        attn_backend, pdl=pdl)
    return model.norm(residual)
