"""Attention over variable-length query spans against a paged KV cache.

One interface (`AttentionBackend`), two implementations: `torch` (the CPU oracle) and
`triton` (CUDA). See `backend.py` for the contract and tensor layouts.
"""

from llmbatch.runtime.attention.backend import AttentionBackend, AttentionMetadata

__all__ = ["AttentionBackend", "AttentionMetadata", "get_attention_backend"]


def get_attention_backend(name: str, device_type: str) -> AttentionBackend:
    """Resolve `auto` | `torch` | `triton` for a device type ("cpu" or "cuda")."""
    if name == "auto":
        name = "triton" if device_type == "cuda" else "torch"
    if name == "torch":
        from llmbatch.runtime.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend()
    if name == "triton":
        from llmbatch.runtime.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r}; choose auto, torch or triton")
