"""Native model implementations (Llama family) and the architecture registry."""

from llmbatch.runtime.models.registry import build_model, supported_architectures

__all__ = ["build_model", "supported_architectures"]
