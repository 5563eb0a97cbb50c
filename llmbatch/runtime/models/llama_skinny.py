"""The Llama-family decode path on skinny matmuls (EngineConfig.skinny_matmul, opt-in) and on
one-row GEMVs (EngineConfig.skinny_gemv, on by default on CUDA since stop 17).

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
programmatic dependent launch (layers/skinny_matmul.py). With EngineConfig.skinny_gemv,
one-token steps (batch-1 decode) call layers/gemv.py instead: the same fusions on one row,
split-K reduced inside the launch; model.skinny_gemv_counters is its arrival-counter buffer,
allocated here before any graph capture and left all zero by every call. skinny_gemv without
skinny_matmul (the default) sets model.skinny_max_tokens to 1: only one-token steps take this
path; steps of 2+ tokens stay on the unfused layers (the 16-row skinny kernels measured slower
than cuBLAS there: W-RANDOM 0.93x in stop 17).

EngineConfig.gemv_max_rows = R > 1 (opt-in, unmeasured): steps of up to R tokens run on the
gemv kernels (gemv_linear's multi-row kernel, each weight tile loaded once for all rows: a
batch-1 verify step of k + 1 tokens), model.skinny_gemv_max_rows = R; without skinny_matmul
skinny_max_tokens is R, so steps of R + 1.. tokens stay unfused. The LM head takes up to R
rows on gemv too (ParallelLMHead.gemv_max_rows).
"""

from __future__ import annotations

import functools

import torch

from llmbatch.runtime.layers import gemv
from llmbatch.runtime.layers import skinny_matmul as sm


def _linears(layer):
    attn, mlp = layer.self_attn, layer.mlp
    return (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)


def enable_skinny_matmul(model, pdl: bool = False, gemv_rows: bool = False,
                         small_steps: bool = True, gemv_max_rows: int = 1) -> bool:
    """Switch the fused path on for every LlamaModel inside `model` whose linear layers are all
    dense and unsharded (tp_size 1, no quant_method); returns True when at least one was.
    pdl: its kernels launch with programmatic dependent launch (EngineConfig.pdl; the caller
    checked for CUDA sm_90+). gemv_rows: one-token steps use layers/gemv.py
    (EngineConfig.skinny_gemv). small_steps: steps of 2..16 tokens take the 16-row skinny
    kernels too (EngineConfig.skinny_matmul); without it only steps of up to gemv_max_rows
    tokens take this path (gemv_rows must then be set). gemv_max_rows: with gemv_rows, steps
    of up to this many tokens (1..gemv.GEMV_MAX_ROWS) run on the gemv kernels
    (EngineConfig.gemv_max_rows)."""
    from llmbatch.runtime.models.llama import LlamaModel

    if not (small_steps or gemv_rows):
        raise ValueError("enable_skinny_matmul: small_steps=False needs gemv_rows=True")
    if not 1 <= gemv_max_rows <= gemv.GEMV_MAX_ROWS:
        raise ValueError(f"enable_skinny_matmul: gemv_max_rows must be in "
                         f"1..{gemv.GEMV_MAX_ROWS}, got {gemv_max_rows}")
    enabled = False
    for module in model.modules():
        if not isinstance(module, LlamaModel):
            continue
        ok = all(lin.quant_method is None and lin.tp_size == 1
                 for layer in module.layers for lin in _linears(layer))
        module.use_skinny_matmul = ok
        module.skinny_max_tokens = sm.MAX_M if small_steps else gemv_max_rows
        module.skinny_pdl = ok and pdl
        module.skinny_gemv_counters = (_gemv_counters(module, gemv_max_rows)
                                       if ok and gemv_rows else None)
        module.skinny_gemv_max_rows = gemv_max_rows
        enabled = enabled or ok
    _set_head_gemv(model, enabled and gemv_rows, gemv_max_rows)
    return enabled


def _set_head_gemv(model, on: bool, max_rows: int = 1) -> None:
    """LM head calls of up to max_rows rows on layers/gemv.py (ParallelLMHead.use_gemv,
    gemv_max_rows) with the gemv layers, for unsharded, unquantized heads."""
    from llmbatch.runtime.layers.embedding import ParallelLMHead

    for head in model.modules():
        if isinstance(head, ParallelLMHead):
            head.use_gemv = on and head.tp_size == 1 and head.quant_method is None
            head.gemv_max_rows = max_rows


def disable_skinny_matmul(model) -> None:
    """Back to the unfused layers for every LlamaModel inside `model` (bench_batch1's rows)."""
    from llmbatch.runtime.models.llama import LlamaModel

    for module in model.modules():
        if isinstance(module, LlamaModel):
            module.use_skinny_matmul = module.skinny_pdl = False
            module.skinny_gemv_counters = None
            module.skinny_max_tokens = sm.MAX_M
            module.skinny_gemv_max_rows = 1
    _set_head_gemv(model, False)


def _gemv_counters(module, max_rows: int = 1) -> torch.Tensor:
    """One zeroed int32 counter per column tile of the widest gemv call of `module` (one row,
    and with max_rows > 1 the multi-row tiles, all rows alike): launches run one after another
    on the stream and each leaves its counters zero, so all share it."""
    tiles = 1
    for layer in module.layers:
        for lin, gate_up in zip(_linears(layer), (False, False, True, False)):
            w = lin.weight
            for rows in {1, max_rows}:
                cfg = gemv.pick_config(w.shape[0], w.shape[1], gate_up, rows)
                tiles = max(tiles, gemv.counter_tiles(w.shape[0], gate_up, cfg))
    device = module.layers[0].mlp.down_proj.weight.device
    return torch.zeros(tiles, dtype=torch.int32, device=device)


def skinny_applies(model, hidden: torch.Tensor) -> bool:
    """hidden (num_tokens, hidden_size): the step is small enough and the weights match it."""
    max_tokens = getattr(model, "skinny_max_tokens", sm.MAX_M)  # 1: one-token steps only
    if not 1 <= hidden.shape[0] <= max_tokens or not len(model.layers):
        return False
    return sm.skinny_matmul_supported(hidden, model.layers[0].self_attn.qkv_proj.weight)


def skinny_layer_forward(layer, rope, residual: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, attn_meta, attn_backend,
                         pdl: bool = False, gemv_counters=None,
                         gemv_max_rows: int = 1) -> torch.Tensor:
    """residual (num_tokens, hidden_size): the full residual stream entering the layer ->
    the stream leaving it (same shape). pdl: skinny launches use programmatic dependent
    launch. gemv_counters (not None): a step of up to gemv_max_rows tokens runs on
    layers/gemv.py."""
    attn, mlp = layer.self_attn, layer.mlp
    in_norm, post_norm = layer.input_layernorm, layer.post_attention_layernorm
    linear = sm.skinny_linear
    if gemv_counters is not None and residual.shape[0] <= gemv_max_rows:
        linear = functools.partial(gemv.gemv_linear, counters=gemv_counters)
    qkv = linear(residual, attn.qkv_proj.weight, attn.qkv_proj.bias,
                 norm_weight=in_norm.weight, eps=in_norm.eps, pdl=pdl)
    out = attn.attend(rope, qkv, k_cache, v_cache, attn_meta, attn_backend)
    residual = linear(out, attn.o_proj.weight, attn.o_proj.bias, residual=residual, pdl=pdl)
    act = linear(residual, mlp.gate_up_proj.weight, mlp.gate_up_proj.bias,
                 norm_weight=post_norm.weight, eps=post_norm.eps, gate_up=True, pdl=pdl)
    return linear(act, mlp.down_proj.weight, mlp.down_proj.bias, residual=residual, pdl=pdl)


def skinny_model_forward(model, hidden: torch.Tensor, rope, kv_caches, attn_meta,
                         attn_backend) -> torch.Tensor:
    """LlamaModel.forward after the embedding: hidden (num_tokens, hidden_size) embeddings ->
    final-normed hidden states, like the unfused loop."""
    residual = hidden
    pdl = getattr(model, "skinny_pdl", False)  # set by enable_skinny_matmul
    counters = getattr(model, "skinny_gemv_counters", None)
    max_rows = getattr(model, "skinny_gemv_max_rows", 1)
    for layer, (k_cache, v_cache) in zip(model.layers, kv_caches):
        residual = skinny_layer_forward(layer, rope, residual, k_cache, v_cache, attn_meta,
                                        attn_backend, pdl=pdl, gemv_counters=counters,
                                        gemv_max_rows=max_rows)
    return model.norm(residual)
