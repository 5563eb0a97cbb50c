"""Which weights the Llama-family model touches into L2 ahead of use, and when
(EngineConfig.l2_prefetch, opt-in; the kernel and its side stream are layers/l2_prefetch.py).

For steps of at most MAX_TOKENS tokens (decode at small batch, small verify steps), each touch
is forked off the main stream right after a matmul and overlaps the cheap kernels that follow.
The default plan (PrefetchPlan()):

    model start        layer 0's qkv weight       overlaps the embedding and first RMSNorm
    after qkv_proj     this layer's o_proj weight overlaps rotary + K/V store + attention
    after gate_up_proj the next layer's qkv weight overlaps SiLU·mul, down_proj, RMSNorm

PrefetchPlan.gate_up_mib also touches the first MiB of gate_up's weight after o_proj's, in the
same window (the 1B shape's gate_up is 64 MiB and streams at ~3.7 TB/s already; whether a
partly L2-resident gate_up gains is for bench/bench_batch1.py to say). down_proj is not
touched: the window before it is a single SiLU·mul. The model's forward joins the side stream
once, before it returns (CUDA graph capture needs every fork joined). Dense weights only (a
quantized layer's weight is not the tensor its kernel reads).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from llmbatch.runtime.layers.l2_prefetch import L2Prefetcher, prefetch_words

# Steps with more tokens are matmul-bound enough that the touch would only compete for HBM.
MAX_TOKENS = 16


@dataclass(frozen=True)
class PrefetchPlan:
    o_proj: bool = True        # o_proj's weight after qkv_proj
    next_qkv: bool = True      # the next layer's qkv weight after gate_up_proj (layer 0's at start)
    gate_up_mib: float = 0.0   # MiB of gate_up's weight (its first rows) after o_proj's touch

    @property
    def label(self) -> str:
        parts = [n for n in ("o_proj", "next_qkv") if getattr(self, n)]
        if self.gate_up_mib > 0:
            parts.append(f"gate_up {self.gate_up_mib:g} MiB")
        return "+".join(parts) or "nothing"


class PrefetchHook:
    """Called by the model at one point of its forward with the step's token count: touches
    each of `words` (int32 views of weights, in order) on `prefetcher`'s stream when the step
    is small."""

    def __init__(self, prefetcher: L2Prefetcher, words: list[torch.Tensor],
                 names: list[str]) -> None:
        self.prefetcher, self.words, self.names = prefetcher, words, names

    def __call__(self, num_tokens: int) -> None:
        if num_tokens <= MAX_TOKENS:
            for w in self.words:
                self.prefetcher.issue(w)


def _words(linear, mib: Optional[float] = None) -> Optional[torch.Tensor]:
    """The int32 view of a dense linear layer's weight (its first `mib` MiB when given), or
    None when it is quantized or has no such view."""
    if linear.quant_method is not None:
        return None
    words = prefetch_words(linear.weight)
    if words is None or mib is None:
        return words
    return words[:max(1, int(mib * (1 << 20)) // 4)]


def _hook(prefetcher: L2Prefetcher, named: list[tuple[str, Optional[torch.Tensor]]]
          ) -> Optional[PrefetchHook]:
    kept = [(n, w) for n, w in named if w is not None]
    if not kept:
        return None
    return PrefetchHook(prefetcher, [w for _, w in kept], [n for n, _ in kept])


def enable_l2_prefetch(model, device: torch.device, prefetcher: Optional[L2Prefetcher] = None,
                       plan: PrefetchPlan = PrefetchPlan()) -> int:
    """Install the hooks of `plan` on every LlamaModel inside `model` (one prefetcher, one
    side stream), replacing any earlier ones; returns how many weights (or weight prefixes)
    are touched per small step (0: nothing applied)."""
    from llmbatch.runtime.models.llama import LlamaModel

    disable_l2_prefetch(model)
    installed = 0
    for module in model.modules():
        if not isinstance(module, LlamaModel) or not len(module.layers):
            continue
        prefetcher = prefetcher or L2Prefetcher(device)
        layers = list(module.layers)
        qkv = [(f"layers.{i}.qkv_proj", _words(layer.self_attn.qkv_proj) if plan.next_qkv
                else None) for i, layer in enumerate(layers)]
        module.l2_prefetch = _hook(prefetcher, qkv[:1])
        for i, layer in enumerate(layers):
            after_qkv = [(f"layers.{i}.o_proj",
                          _words(layer.self_attn.o_proj) if plan.o_proj else None)]
            if plan.gate_up_mib > 0:
                after_qkv.append((f"layers.{i}.gate_up_proj[:{plan.gate_up_mib:g} MiB]",
                                  _words(layer.mlp.gate_up_proj, plan.gate_up_mib)))
            layer.self_attn.l2_prefetch = _hook(prefetcher, after_qkv)
            layer.mlp.l2_prefetch = _hook(prefetcher, qkv[i + 1:i + 2])
        hooks = [module.l2_prefetch] + [h for layer in layers
                                        for h in (layer.self_attn.l2_prefetch,
                                                  layer.mlp.l2_prefetch)]
        touched = sum(len(h.words) for h in hooks if h is not None)
        module.l2_prefetcher = prefetcher if touched else None
        installed += touched
    return installed


def disable_l2_prefetch(model) -> None:
    from llmbatch.runtime.models.llama import LlamaModel

    for module in model.modules():
        if isinstance(module, LlamaModel):
            module.l2_prefetch = module.l2_prefetcher = None
            for layer in module.layers:
                layer.self_attn.l2_prefetch = layer.mlp.l2_prefetch = None
