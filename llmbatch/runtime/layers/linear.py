"""Linear layers that own their tensor-parallel slice of a weight (nano-vllm style).

Each layer allocates only this rank's part of the weight (tp_rank / tp_size are given at
construction) and puts a `weight_loader(param, loaded_weight, shard_id=None)` on every parameter
that copies exactly that part out of a full checkpoint tensor (see weight_utils: the tensor may
be lazy, so a rank reads only its slice from disk). At tp_size 1 every layer is a plain linear.

    ColumnParallelLinear   W (out, in) split along out: each rank computes out/tp features.
    MergedColumnParallel   several column-parallel outputs fused in one matmul (gate/up);
                           each logical part is split separately, so a rank's slice of the fused
                           weight is [gate_r; up_r], never a slice of [gate; up].
    QKVParallelLinear      fused q/k/v with GQA: a rank holds num_heads/tp query heads and
                           num_kv_heads/tp KV heads (or one replicated KV head when tp > kv heads).
    RowParallelLinear      W split along in: partial sums, then an all-reduce (a no-op at tp 1).
    ReplicatedLinear       every rank holds everything.

Quantization seam: a layer's `quant_method` (None = dense) may replace the matmul after loading;
`quant_method.apply(layer, x, bias)` then computes the output and
`quant_method.process_weights_after_loading(layer)` is called once by the loader, so a quantizer
sees only this rank's slice.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from llmbatch.runtime.layers.weight_utils import (LoadedWeight, check_shape, copy_checked,
                                                  materialize, narrow)

AllReduce = Callable[[torch.Tensor], torch.Tensor]


def check_tp(tp_rank: int, tp_size: int) -> None:
    if tp_size < 1 or not 0 <= tp_rank < tp_size:
        raise ValueError(f"invalid tensor-parallel rank {tp_rank} of size {tp_size}")


class TensorParallelSplitError(ValueError):
    """The model's shape does not split over the ranks: the job layer blames the job's
    tensor-parallel size (jobs/engine_factory.py reads job_key), not the model."""
    job_key = "parallel.tensor_parallel_size"


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise TensorParallelSplitError(f"{what}={numerator} is not divisible by "
                                       f"tensor_parallel_size={denominator}")
    return numerator // denominator


def default_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over all ranks of the default process group (one process per TP rank)."""
    torch.distributed.all_reduce(x)
    return x


class LinearBase(nn.Module):
    """Holds this rank's weight (out_per_rank, in_per_rank) and optional bias (out_per_rank,)."""

    def __init__(self, input_size_per_rank: int, output_size_per_rank: int, bias: bool,
                 params_dtype: Optional[torch.dtype], tp_rank: int, tp_size: int) -> None:
        super().__init__()
        check_tp(tp_rank, tp_size)
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.input_size_per_rank = input_size_per_rank
        self.output_size_per_rank = output_size_per_rank
        # Full (unsharded) sizes; subclasses that shard overwrite the one they split.
        self.input_size = getattr(self, "input_size", input_size_per_rank)
        self.output_size = getattr(self, "output_size", output_size_per_rank)
        dtype = params_dtype or torch.get_default_dtype()
        # Inference only: no autograd bookkeeping on weights.
        self.weight = nn.Parameter(
            torch.empty(output_size_per_rank, input_size_per_rank, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size_per_rank, dtype=dtype),
                                     requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)
        self.quant_method = None

    def weight_loader(self, param: nn.Parameter, loaded_weight: LoadedWeight,
                      shard_id=None) -> None:
        raise NotImplementedError

    def matmul(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if self.quant_method is not None:
            return self.quant_method.apply(self, x, bias)
        return F.linear(x, self.weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)

    def extra_repr(self) -> str:
        return (f"in={self.input_size_per_rank}, out={self.output_size_per_rank}, "
                f"bias={self.bias is not None}, tp={self.tp_rank}/{self.tp_size}")


class ReplicatedLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 params_dtype: Optional[torch.dtype] = None, tp_rank: int = 0,
                 tp_size: int = 1) -> None:
        super().__init__(input_size, output_size, bias, params_dtype, tp_rank, tp_size)

    def weight_loader(self, param, loaded_weight, shard_id=None) -> None:
        if shard_id is not None:
            raise ValueError(f"ReplicatedLinear got shard_id={shard_id!r}")
        with torch.no_grad():
            copy_checked(param.data, materialize(loaded_weight), "ReplicatedLinear")


class ColumnParallelLinear(LinearBase):
    """y_r = x W_r^T with W_r = rows [r*out/tp, (r+1)*out/tp) of W; outputs stay sharded."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 params_dtype: Optional[torch.dtype] = None, tp_rank: int = 0,
                 tp_size: int = 1) -> None:
        check_tp(tp_rank, tp_size)
        self.output_size = output_size
        super().__init__(input_size, divide(output_size, tp_size, "output_size"), bias,
                         params_dtype, tp_rank, tp_size)

    def weight_loader(self, param, loaded_weight, shard_id=None) -> None:
        if shard_id is not None:
            raise ValueError(f"ColumnParallelLinear got shard_id={shard_id!r}")
        check_shape(loaded_weight, (self.output_size,) + tuple(param.shape[1:]),
                    "ColumnParallelLinear")
        size = param.shape[0]
        with torch.no_grad():
            copy_checked(param.data, narrow(loaded_weight, 0, self.tp_rank * size, size),
                         "ColumnParallelLinear")


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Fused [part_0; part_1; ...] (e.g. gate_proj, up_proj); shard_id is the part index."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False,
                 params_dtype: Optional[torch.dtype] = None, tp_rank: int = 0,
                 tp_size: int = 1) -> None:
        for size in output_sizes:
            divide(size, tp_size, "merged output size")
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias, params_dtype, tp_rank, tp_size)

    def weight_loader(self, param, loaded_weight, shard_id=None) -> None:
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(f"MergedColumnParallelLinear needs shard_id in "
                             f"0..{len(self.output_sizes) - 1}, got {shard_id!r}")
        check_shape(loaded_weight, (self.output_sizes[shard_id],) + tuple(param.shape[1:]),
                    f"MergedColumnParallelLinear part {shard_id}")
        size = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        with torch.no_grad():
            copy_checked(param.data.narrow(0, offset, size),
                         narrow(loaded_weight, 0, self.tp_rank * size, size),
                         f"MergedColumnParallelLinear part {shard_id}")


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection. Per rank output = [q (num_heads*hd); k (num_kv_heads*hd); v].

    KV heads: with total_num_kv_heads >= tp_size each rank holds total/tp of them; otherwise
    (e.g. 8 ranks, 2 KV heads) each rank holds one head, replicated on tp/total ranks.
    """

    def __init__(self, hidden_size: int, head_dim: int, total_num_heads: int,
                 total_num_kv_heads: int, bias: bool = False,
                 params_dtype: Optional[torch.dtype] = None, tp_rank: int = 0,
                 tp_size: int = 1) -> None:
        check_tp(tp_rank, tp_size)
        self.head_dim = head_dim
        self.total_num_heads, self.total_num_kv_heads = total_num_heads, total_num_kv_heads
        self.num_heads = divide(total_num_heads, tp_size, "num_attention_heads")
        if total_num_kv_heads >= tp_size:
            self.num_kv_heads = divide(total_num_kv_heads, tp_size, "num_key_value_heads")
            self.kv_head_start = tp_rank * self.num_kv_heads
        else:
            if tp_size % total_num_kv_heads:
                raise TensorParallelSplitError(
                    f"tensor_parallel_size={tp_size} is neither a divisor nor a multiple of "
                    f"num_key_value_heads={total_num_kv_heads}")
            self.num_kv_heads = 1
            self.kv_head_start = tp_rank // (tp_size // total_num_kv_heads)
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        self.output_size = (total_num_heads + 2 * total_num_kv_heads) * head_dim
        # Bypass ColumnParallelLinear's even split: the per-rank size is computed above.
        LinearBase.__init__(self, hidden_size, self.q_size + 2 * self.kv_size, bias,
                            params_dtype, tp_rank, tp_size)

    def weight_loader(self, param, loaded_weight, shard_id=None) -> None:
        # (offset in this rank's fused rows, rows, first row in the checkpoint tensor)
        if shard_id == "q":
            offset, size, start = 0, self.q_size, self.tp_rank * self.q_size
        elif shard_id == "k":
            offset, size, start = self.q_size, self.kv_size, self.kv_head_start * self.head_dim
        elif shard_id == "v":
            offset, size = self.q_size + self.kv_size, self.kv_size
            start = self.kv_head_start * self.head_dim
        else:
            raise ValueError(f"QKVParallelLinear needs shard_id 'q', 'k' or 'v', got {shard_id!r}")
        heads = self.total_num_heads if shard_id == "q" else self.total_num_kv_heads
        check_shape(loaded_weight, (heads * self.head_dim,) + tuple(param.shape[1:]),
                    f"QKVParallelLinear {shard_id}")
        with torch.no_grad():
            copy_checked(param.data.narrow(0, offset, size), narrow(loaded_weight, 0, start, size),
                         f"QKVParallelLinear {shard_id}")

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(n, q_size + 2*kv_size) -> q (n, q_size), k (n, kv_size), v (n, kv_size)."""
        return qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)


class RowParallelLinear(LinearBase):
    """y = sum_r x_r W_r^T with W_r = columns of rank r; x arrives already sharded (from a
    column-parallel layer). The bias is added on rank 0 only, so the all-reduce adds it once."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 params_dtype: Optional[torch.dtype] = None, tp_rank: int = 0,
                 tp_size: int = 1, all_reduce: Optional[AllReduce] = None) -> None:
        check_tp(tp_rank, tp_size)
        self.input_size = input_size
        super().__init__(divide(input_size, tp_size, "input_size"), output_size, bias,
                         params_dtype, tp_rank, tp_size)
        self.all_reduce = all_reduce or default_all_reduce

    def weight_loader(self, param, loaded_weight, shard_id=None) -> None:
        if shard_id is not None:
            raise ValueError(f"RowParallelLinear got shard_id={shard_id!r}")
        full = (self.output_size,) if param.dim() == 1 else (self.output_size, self.input_size)
        check_shape(loaded_weight, full, "RowParallelLinear")
        with torch.no_grad():
            if param.dim() == 1:  # bias: replicated
                copy_checked(param.data, materialize(loaded_weight), "RowParallelLinear bias")
            else:
                size = param.shape[1]
                copy_checked(param.data, narrow(loaded_weight, 1, self.tp_rank * size, size),
                             "RowParallelLinear")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x, self.bias if self.tp_rank == 0 else None)
        if self.tp_size > 1:
            y = self.all_reduce(y)
        return y
