"""Vocabulary-parallel token embedding and LM head.

Rank r holds the contiguous vocabulary rows [r*per_rank, min((r+1)*per_rank, vocab)) with
per_rank = ceil(vocab / tp_size); the last rank's tail rows are zero padding. At tp_size 1 the
embedding is a plain lookup and the head a plain matmul.

    embedding: ids outside this rank's range produce zeros; an all-reduce sums the ranks.
    lm head:   each rank computes logits for its rows; an all-gather concatenates them, and the
               padding columns are cut off.
Tied embeddings (tie_word_embeddings): the head is built with `tied_embedding=` and reuses the
embedding's Parameter, allocating nothing of its own.
Quantized (EngineConfig.quantize_embeddings, nf4): `quant_method` (quantization.
Nf4EmbeddingMethod) replaces `weight` by nf4 buffers after loading; the lookup dequantizes only
the looked-up rows and the head runs the nf4 matmul. Works at any tp_size (whole rows per rank).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from llmbatch.runtime.layers.linear import AllReduce, check_tp, default_all_reduce
from llmbatch.runtime.layers.weight_utils import LoadedWeight, copy_checked, narrow

AllGather = Callable[[torch.Tensor], torch.Tensor]


def default_all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate the ranks' (n, per_rank) tensors along the last dim (default group)."""
    parts = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, x)
    return torch.cat(parts, dim=-1)


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int,
                 params_dtype: Optional[torch.dtype] = None, tp_rank: int = 0, tp_size: int = 1,
                 all_reduce: Optional[AllReduce] = None,
                 shared_weight: Optional[nn.Parameter] = None) -> None:
        super().__init__()
        check_tp(tp_rank, tp_size)
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.num_embeddings_per_rank = -(-num_embeddings // tp_size)
        self.vocab_start = tp_rank * self.num_embeddings_per_rank
        self.vocab_end = min(self.vocab_start + self.num_embeddings_per_rank, num_embeddings)
        shape = (self.num_embeddings_per_rank, embedding_dim)
        if shared_weight is not None:
            # Tied: the very same Parameter object, loaded once (through its owner's loader).
            if tuple(shared_weight.shape) != shape:
                raise ValueError(f"tied weight has shape {tuple(shared_weight.shape)}, "
                                 f"expected {shape}")
            self.weight = shared_weight
        else:
            dtype = params_dtype or torch.get_default_dtype()
            self.weight = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
            self.weight.weight_loader = self.weight_loader
        self.all_reduce = all_reduce or default_all_reduce
        self.quant_method = None  # set before loading by attach_quantization(embeddings=True)

    def weight_loader(self, param: nn.Parameter, loaded_weight: LoadedWeight,
                      shard_id=None) -> None:
        if shard_id is not None:
            raise ValueError(f"{type(self).__name__} got shard_id={shard_id!r}")
        if tuple(loaded_weight.shape) != (self.num_embeddings, self.embedding_dim):
            raise ValueError(
                f"{type(self).__name__}: checkpoint shape {tuple(loaded_weight.shape)} does not "
                f"match (vocab_size, hidden_size)=({self.num_embeddings}, {self.embedding_dim})")
        rows = self.vocab_end - self.vocab_start
        with torch.no_grad():
            copy_checked(param.data[:rows], narrow(loaded_weight, 0, self.vocab_start, rows),
                         type(self).__name__)
            param.data[rows:].zero_()  # padding rows of the last rank

    def lookup(self, local_ids: torch.Tensor) -> torch.Tensor:
        """Rows of this rank's table: (num_tokens,) -> (num_tokens, embedding_dim)."""
        if self.quant_method is not None:
            return self.quant_method.embedding(self, local_ids)
        return F.embedding(local_ids, self.weight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(num_tokens,) int64 -> (num_tokens, embedding_dim)"""
        if self.tp_size == 1:
            return self.lookup(input_ids)
        in_range = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local_ids = (input_ids - self.vocab_start) * in_range
        out = self.lookup(local_ids)
        out = out * in_range.unsqueeze(-1).to(out.dtype)
        return self.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """hidden (n, hidden_size) -> logits (n, vocab_size), float32."""

    # Set by models/llama_skinny.enable_skinny_matmul with the gemv layers (EngineConfig.
    # skinny_gemv, tp_size 1, unquantized): one-row calls take layers/gemv.py, which measured
    # 118.4 us against cuBLAS's 125.8 on the 1B head (128256 x 2048 bf16, H200, stop 17).
    use_gemv: bool = False
    # With use_gemv: calls of up to this many rows take gemv_linear (EngineConfig.gemv_max_rows;
    # > 1: its multi-row kernel, unmeasured).
    gemv_max_rows: int = 1

    def __init__(self, num_embeddings: int, embedding_dim: int,
                 params_dtype: Optional[torch.dtype] = None, tp_rank: int = 0, tp_size: int = 1,
                 all_gather: Optional[AllGather] = None,
                 tied_embedding: Optional[VocabParallelEmbedding] = None) -> None:
        shared = tied_embedding.weight if tied_embedding is not None else None
        super().__init__(num_embeddings, embedding_dim, params_dtype, tp_rank, tp_size,
                         shared_weight=shared)
        self.all_gather = all_gather or default_all_gather

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # Logits in the weights' dtype (as transformers does), upcast for the sampler.
        if self.quant_method is not None:  # nf4 table (quantize_embeddings)
            logits = self.quant_method.apply(self, hidden, None)  # (n, num_embeddings_per_rank)
        elif self.use_gemv and 1 <= hidden.shape[0] <= self.gemv_max_rows:
            return self.gemv_logits(hidden)
        else:
            logits = F.linear(hidden, self.weight)  # (n, num_embeddings_per_rank)
        if self.tp_size > 1:
            logits = self.all_gather(logits)[:, :self.num_embeddings]
        return logits.float()

    def gemv_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (M, hidden_size) -> float32 logits (M, vocab) on layers/gemv.py, rounded to
        the weights' dtype in the kernel and stored as float32: F.linear(...).float()'s
        values without the upcast's launch (a 128256-wide copy, ~4 us a batch-1 token in
        stop 17's profile). Also what the gemv start-up check launches (gemv_check)."""
        from llmbatch.runtime.layers import gemv

        return gemv.gemv_linear(hidden.contiguous(), self.weight, out_dtype=torch.float32)
