"""Start-up check of the one-token gemv layers (EngineConfig.skinny_gemv, on by default on CUDA).

layers/gemv.py was written and tested in the Triton interpreter and measured on one H200; on
another GPU or Triton a wrong kernel must cost speed, never tokens (as kernel_paths'
check_quant_kernel does for the int8 / nf4 GEMMs). So before the decode graphs are captured,
each of the four gemv launches of a decoder layer, with the prologue / epilogue the engine
uses, runs once on layer 0's weights and a seeded random row, against the same arithmetic in
float32 torch:

    qkv     = linear(rmsnorm(x) , W_qkv) + b          (RMSNorm prologue)
    o_proj  = linear(a, W_o) + b + residual            (residual epilogue)
    act     = silu(g) * u, [g; u] = linear(rmsnorm(x), W_gate_up) + b   (prologue + SiLU·mul)
    down    = linear(act, W_down) + b + residual       (residual epilogue)
    logits  = linear(x, W_head)                         (the LM head, when it uses gemv)

The tolerance admits the model dtype's rounding of the output (the kernel rounds step by step
like the unfused layers), not a wrong row, column or flag (those are off by O(|y|)).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (1, K) float32 -> RMSNorm(x) * weight, float32."""
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.float()


def _linear(x: torch.Tensor, lin) -> torch.Tensor:
    bias = lin.bias.float() if lin.bias is not None else None
    return F.linear(x, lin.weight.float(), bias)


def check_gemv_layers(model) -> Optional[str]:
    """None when every gemv launch of the first LlamaModel with gemv layers matches torch on
    its layer 0, else a one-line reason (the first failing launch). model: the loaded model
    after llama_skinny.enable_skinny_matmul(..., gemv_rows=True)."""
    from llmbatch.runtime.layers import gemv
    from llmbatch.runtime.models.llama import LlamaModel

    module = next((m for m in model.modules() if isinstance(m, LlamaModel)
                   and getattr(m, "skinny_gemv_counters", None) is not None and len(m.layers)),
                  None)
    if module is None:
        return None
    layer = module.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    in_norm, post_norm = layer.input_layernorm, layer.post_attention_layernorm
    weight = attn.qkv_proj.weight
    dtype, device = weight.dtype, weight.device
    gen = torch.Generator(device="cpu").manual_seed(0)

    def row(width: int) -> torch.Tensor:
        return torch.randn(1, width, generator=gen).to(dtype=dtype, device=device)

    hidden, inter = weight.shape[1], mlp.down_proj.weight.shape[1]
    x, a, act_in, res = row(hidden), row(attn.o_proj.weight.shape[1]), row(inter), row(hidden)
    launch = dict(counters=module.skinny_gemv_counters, pdl=getattr(module, "skinny_pdl", False))

    def gate_up_ref() -> torch.Tensor:
        g, u = _linear(_rms_norm(x.float(), post_norm.weight, post_norm.eps),
                       mlp.gate_up_proj).chunk(2, dim=-1)
        return F.silu(g) * u

    cases = (
        ("qkv", lambda: gemv.gemv_linear(x, weight, attn.qkv_proj.bias,
                                         norm_weight=in_norm.weight, eps=in_norm.eps, **launch),
         lambda: _linear(_rms_norm(x.float(), in_norm.weight, in_norm.eps), attn.qkv_proj)),
        ("o_proj", lambda: gemv.gemv_linear(a, attn.o_proj.weight, attn.o_proj.bias,
                                            residual=res, **launch),
         lambda: _linear(a.float(), attn.o_proj) + res.float()),
        ("gate_up", lambda: gemv.gemv_linear(x, mlp.gate_up_proj.weight, mlp.gate_up_proj.bias,
                                             norm_weight=post_norm.weight, eps=post_norm.eps,
                                             gate_up=True, **launch),
         gate_up_ref),
        ("down", lambda: gemv.gemv_linear(act_in, mlp.down_proj.weight, mlp.down_proj.bias,
                                          residual=res, **launch),
         lambda: _linear(act_in.float(), mlp.down_proj) + res.float()),
    )
    head = next((h for h in model.modules() if getattr(h, "use_gemv", False)), None)
    if head is not None:   # ParallelLMHead with one-row calls on gemv (no prologue/epilogue)
        cases += (("lm_head", lambda: gemv.gemv_linear(x, head.weight),
                   lambda: F.linear(x.float(), head.weight.float())),)
    for name, run, reference in cases:
        try:
            got = run().float()
        except Exception as exc:   # a compile or launch failure on this GPU / Triton
            return f"{name}: {type(exc).__name__}: {exc}"
        want = reference()
        if got.shape != want.shape:
            return f"{name}: output shape {tuple(got.shape)}, expected {tuple(want.shape)}"
        err = (got - want).abs().max().item()
        bound = 0.03 * want.abs().max().item() + 1e-3
        if not err <= bound:   # also catches NaN
            return f"{name}: max |gemv - torch| = {err:.3g} exceeds {bound:.3g}"
    return None
