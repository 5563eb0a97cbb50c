"""Per-request sampling parameters (no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class SamplingParams:
    """How one request samples and when it stops.

    temperature == 0 means greedy. top_k <= 0 (or -1) disables top-k; top_p == 1.0 disables
    top-p. `seed` makes sampling reproducible per request, independent of batch composition.
    `logprobs`: None for no logprobs, else the number of top logprobs to return per token
    (0 returns only the sampled token's logprob).
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: Optional[int] = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0 or self.temperature == float("inf"):  # NaN fails >=
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:   # NaN fails too
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0 or null, got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
