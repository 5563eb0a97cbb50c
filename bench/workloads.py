"""The fixed workloads of BENCH.md as plain token-id lists (no torch).

Every workload is drawn from `random.Random(seed)` (seed 0) in exactly the order BENCH.md gives,
so the totals are reproducible to the token: for vocab 128256, W-RANDOM has 154,607 prompt and
74,250 output tokens, W-PREFIX 282,325 prompt and 32,768 output tokens (asserted in
tests/test_bench.py). Token ids come from [100, vocab): ids below 100 are left to special tokens.

`scale` shrinks a workload for the CPU dry run (tiny shape): the number of requests and every
length are scaled down AFTER drawing with the full-size draw order, so a scaled workload is a
deterministic subset-shaped image of the real one, not a different random stream. scale=1.0
is the benchmark itself; anything else is a smoke test only and is labelled as such.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

MIN_TOKEN_ID = 100          # token ids are drawn from [MIN_TOKEN_ID, vocab)
WORKLOAD_NAMES = ("W-RANDOM", "W-PREFIX", "W-BATCH1", "W-SPEC")
SPEC_BATCH_SIZES = (1, 8, 64)
SPEC_ALPHAS = (0.6, 0.8, 0.95)
SPEC_K = 4


@dataclass
class BenchRequest:
    """One request: its prompt and exactly how many tokens it must generate (EOS ignored)."""

    prompt_token_ids: list[int]
    max_new_tokens: int


@dataclass
class Workload:
    name: str
    requests: list[BenchRequest]
    scale: float = 1.0
    # Workload-specific parameters (W-SPEC's batch sizes, alphas, k).
    params: dict = field(default_factory=dict)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(r.prompt_token_ids) for r in self.requests)

    @property
    def num_output_tokens(self) -> int:
        return sum(r.max_new_tokens for r in self.requests)

    def summary(self) -> dict:
        return {"name": self.name, "scale": self.scale, "num_requests": len(self.requests),
                "num_prompt_tokens": self.num_prompt_tokens,
                "num_output_tokens": self.num_output_tokens, "params": self.params}


def _check(vocab: int, scale: float) -> None:
    if vocab <= MIN_TOKEN_ID:
        raise ValueError(f"vocab must be > {MIN_TOKEN_ID} (token ids are drawn from "
                         f"[{MIN_TOKEN_ID}, vocab)), got {vocab}")
    if not 0.0 < scale <= 1.0:
        raise ValueError(f"scale must be in (0, 1], got {scale}")


def scaled(n: int, scale: float) -> int:
    """A length or a count scaled down, never below 1."""
    return max(1, round(n * scale))


def w_random(vocab: int, scale: float = 1.0, seed: int = 0) -> Workload:
    """256 requests; prompt U[128, 1024], output U[64, 512], drawn il, ol, then tokens."""
    _check(vocab, scale)
    rng = random.Random(seed)
    requests = []
    for _ in range(256):
        il, ol = rng.randint(128, 1024), rng.randint(64, 512)
        prompt = [rng.randrange(MIN_TOKEN_ID, vocab) for _ in range(il)]
        requests.append(BenchRequest(prompt[:scaled(il, scale)], scaled(ol, scale)))
    return Workload("W-RANDOM", requests[:scaled(256, scale)], scale)


def w_prefix(vocab: int, scale: float = 1.0, seed: int = 0) -> Workload:
    """256 requests over 8 shared 1024-token prefixes; request i = prefix[i % 8] + own tail.

    Submitted interleaved (0, 1, ..., 7, 0, 1, ...): the runner must find the groups itself.
    Scaling cuts the prefix and the tail separately, so requests still share their prefix.
    """
    _check(vocab, scale)
    rng = random.Random(seed)
    prefixes = [[rng.randrange(MIN_TOKEN_ID, vocab) for _ in range(1024)] for _ in range(8)]
    requests = []
    for i in range(256):
        tail = [rng.randrange(MIN_TOKEN_ID, vocab) for _ in range(rng.randint(32, 128))]
        prompt = prefixes[i % 8][:scaled(1024, scale)] + tail[:scaled(len(tail), scale)]
        requests.append(BenchRequest(prompt, scaled(128, scale)))
    return Workload("W-PREFIX", requests[:scaled(256, scale)], scale)


def w_batch1(vocab: int, scale: float = 1.0, seed: int = 0) -> Workload:
    """One request, prompt 512, output 512; measured as time per output token after the first."""
    _check(vocab, scale)
    rng = random.Random(seed)
    prompt = [rng.randrange(MIN_TOKEN_ID, vocab) for _ in range(512)]
    return Workload("W-BATCH1", [BenchRequest(prompt[:scaled(512, scale)], scaled(512, scale))],
                    scale)


def w_spec(vocab: int, scale: float = 1.0, seed: int = 0) -> Workload:
    """Speculative decoding: 64 prompts of 512 tokens, output 256; batch b uses the first b.

    BENCH.md fixes the shape but not the draw order; ours: the 64 prompts one after another.
    """
    _check(vocab, scale)
    rng = random.Random(seed)
    prompts = [[rng.randrange(MIN_TOKEN_ID, vocab) for _ in range(512)] for _ in range(64)]
    requests = [BenchRequest(p[:scaled(512, scale)], scaled(256, scale)) for p in prompts]
    sizes = tuple(min(b, len(requests)) for b in SPEC_BATCH_SIZES)
    return Workload("W-SPEC", requests, scale,
                    params={"batch_sizes": list(sizes), "alphas": list(SPEC_ALPHAS), "k": SPEC_K})


_BUILDERS = {"W-RANDOM": w_random, "W-PREFIX": w_prefix, "W-BATCH1": w_batch1, "W-SPEC": w_spec}


def build(name: str, vocab: int, scale: float = 1.0) -> Workload:
    if name not in _BUILDERS:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOAD_NAMES)}")
    return _BUILDERS[name](vocab, scale)


def ideal_tokens_per_step(alpha: float, k: int) -> float:
    """Expected tokens per target step with k proposals each accepted with prob. alpha."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)
