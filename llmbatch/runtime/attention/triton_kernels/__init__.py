"""Triton kernels behind TritonAttentionBackend: paged K/V store and paged varlen attention.

Importing this package imports triton; callers that may run without it import lazily.
"""

from llmbatch.runtime.attention.triton_kernels.paged_attention import paged_attention
from llmbatch.runtime.attention.triton_kernels.store_kv import store_kv

__all__ = ["paged_attention", "store_kv"]
