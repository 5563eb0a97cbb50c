"""Tensor-parallel-aware building blocks of the native models (see linear.py for the scheme)."""
