"""Which weights the Llama-family model touches into L2 ahead of use, and when
(EngineConfig.l2_prefetch, opt-in; the kernel and its side stream are layers/l2_prefetch.py).

For steps of at most MAX_TOKENS tokens (decode at small batch, small verify steps), each touch
is forked off the main stream right after a matmul and overlaps the cheap kernels that follow:

    model start        layer 0's qkv weight       overlaps the embedding and first RMSNorm
    after qkv_proj     this layer's o_proj weight overlaps rotary + K/V store + attention
    after gate_up_proj the next layer's qkv weight overlaps SiLU·mul, down_proj, RMSNorm

The large gate_up and down weights (67 and 34 MB on the 1B shape) already stream at full
bandwidth and would not fit L2 beside the others; they are not touched. The model's forward
joins the side stream once, before it returns (CUDA graph capture needs every fork joined).
Applies to dense weights only (a quantized layer's weight is not the tensor its kernel reads).
"""

from __future__ import annotations

from typing import Optional

import torch

from llmbatch.runtime.layers.l2_prefetch import L2Prefetcher, prefetch_words

# Steps with more tokens are matmul-bound enough that the touch would only compete for HBM.
MAX_TOKENS = 16


class PrefetchHook:
    """Called by the model at one point of its forward with the step's token count: touches
    `words` (a weight's int32 view) on `prefetcher`'s stream when the step is small."""

    def __init__(self, prefetcher: L2Prefetcher, words: torch.Tensor, name: str) -> None:
        self.prefetcher, self.words, self.name = prefetcher, words, name

    def __call__(self, num_tokens: int) -> None:
        if num_tokens <= MAX_TOKENS:
            self.prefetcher.issue(self.words)

    def join(self) -> None:
        self.prefetcher.join()


def _hook(prefetcher: L2Prefetcher, linear, name: str) -> Optional[PrefetchHook]:
    if linear.quant_method is not None:
        return None
    words = prefetch_words(linear.weight)
    return PrefetchHook(prefetcher, words, name) if words is not None else None


def enable_l2_prefetch(model, device: torch.device,
                       prefetcher: Optional[L2Prefetcher] = None) -> int:
    """Install the hooks on every LlamaModel inside `model` (one prefetcher, one side stream);
    returns how many weights are touched per small step (0: nothing applied)."""
    from llmbatch.runtime.models.llama import LlamaModel

    installed = 0
    for module in model.modules():
        if not isinstance(module, LlamaModel) or not len(module.layers):
            continue
        prefetcher = prefetcher or L2Prefetcher(device)
        layers = list(module.layers)
        qkv_hooks = [_hook(prefetcher, layer.self_attn.qkv_proj, f"layers.{i}.qkv_proj")
                     for i, layer in enumerate(layers)]
        module.l2_prefetch = qkv_hooks[0]
        for i, layer in enumerate(layers):
            layer.self_attn.l2_prefetch = _hook(prefetcher, layer.self_attn.o_proj,
                                                f"layers.{i}.o_proj")
            layer.mlp.l2_prefetch = qkv_hooks[i + 1] if i + 1 < len(layers) else None
            installed += (layer.self_attn.l2_prefetch is not None) + (qkv_hooks[i] is not None)
        module.l2_prefetcher = prefetcher
    return installed


def disable_l2_prefetch(model) -> None:
    from llmbatch.runtime.models.llama import LlamaModel

    for module in model.modules():
        if isinstance(module, LlamaModel):
            module.l2_prefetch = module.l2_prefetcher = None
            for layer in module.layers:
                layer.self_attn.l2_prefetch = layer.mlp.l2_prefetch = None
