"""A deterministic stand-in for `llmbatch.runtime.engine.Engine`, for tests of the job layer.

Not a model: output tokens are a fixed function of the prompt tokens (a walk over the prompt
starting at sum(prompt), or a seed-dependent walk when temperature > 0), so a run is reproducible bit for bit.
Like the real engine it pulls requests lazily and yields results OUT of input order (a fixed
permutation of each window of requests), and it reports simulated prefix-cache hits.

Selected without code changes by setting
    LLMBATCH_ENGINE_FACTORY=llmbatch.jobs.fake_engine:FakeEngine
(read by the runner; test-only). LLMBATCH_FAKE_ENGINE_DELAY_S adds a sleep per result so tests
can kill a run midway. `model.path` must hold a tokenizer (and may hold a config.json).
"""

from __future__ import annotations

import json
import os
import random
import time
from types import SimpleNamespace
from typing import Iterable, Iterator

from llmbatch.runtime.outputs import GenerationResult

WINDOW = 7          # requests buffered, then emitted in a shuffled (deterministic) order


class FakeEngine:
    def __init__(self, config) -> None:
        # The fast-tokenizer class directly: AutoTokenizer would import torch (seconds per test
        # subprocess) for nothing.
        from transformers import PreTrainedTokenizerFast

        self.config = config
        self.tokenizer = PreTrainedTokenizerFast.from_pretrained(config.tokenizer or config.model)
        max_len = config.max_model_len
        cfg_path = os.path.join(config.model, "config.json")
        if max_len is None and os.path.isfile(cfg_path):
            with open(cfg_path) as f:
                max_len = json.load(f).get("max_position_embeddings")
        self.max_model_len = max_len or 512
        # The KV pool the job layer reads (runner.num_kv_blocks, as on the runtime engine):
        # engine.kv_cache_blocks when the job sets one, else None, a pool without a size
        # (nothing is cached for real here, so no row is ever refused for it).
        self.runner = SimpleNamespace(num_kv_blocks=config.kv_cache_blocks)
        self.delay_s = float(os.environ.get("LLMBATCH_FAKE_ENGINE_DELAY_S", "0") or 0)
        self._block_hashes: set = set()
        self._stats = {"num_prompt_tokens": 0, "num_cached_prompt_tokens": 0,
                       "num_output_tokens": 0, "num_requests": 0}

    def _cached_tokens(self, prompt: list[int]) -> int:
        """Simulated prefix cache: full blocks already seen (chained), never the last token."""
        bs = self.config.block_size
        parent, hits = None, 0
        full = (len(prompt) - 1) // bs if self.config.prefix_caching else 0
        for b in range(full):
            parent = hash((parent, tuple(prompt[b * bs:(b + 1) * bs])))
            if parent in self._block_hashes and hits == b:
                hits += 1
            self._block_hashes.add(parent)
        return hits * bs

    def _finish(self, request) -> GenerationResult:
        prompt = request.prompt_token_ids
        sp = request.sampling_params
        natural = 2 + sum(prompt) % 7           # where this "model" would emit EOS
        n = sp.max_new_tokens if sp.ignore_eos else min(natural, sp.max_new_tokens)
        if not sp.greedy:
            rng = random.Random(f"{sp.seed}:{len(prompt)}")
            out = [prompt[rng.randrange(len(prompt))] for _ in range(n)]
        else:
            out = [prompt[(sum(prompt) + 7 * i) % len(prompt)] for i in range(n)]
        reason = "length" if n == sp.max_new_tokens and natural >= n else "stop"
        cached = self._cached_tokens(prompt)
        for key, value in (("num_prompt_tokens", len(prompt)),
                           ("num_cached_prompt_tokens", cached), ("num_output_tokens", n),
                           ("num_requests", 1)):
            self._stats[key] += value
        logprobs = None
        if sp.logprobs is not None:   # fixed fake values: -0.5 for the sampled token
            logprobs = [{"token_id": t, "logprob": -0.5,
                         "top": [(t, -0.5)] + [(t + 1, -1.5)] * max(0, sp.logprobs - 1)}
                        for t in out]
        prompt_logprobs = None
        if sp.prompt_logprobs is not None:   # fixed fake values: -1.0 for each prompt token
            prompt_logprobs = [None] + [{"token_id": t, "logprob": -1.0,
                                         "top": [(t, -1.0)] * sp.prompt_logprobs}
                                        for t in prompt[1:]]
        return GenerationResult(
            request_id=request.request_id, output_token_ids=out, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            output_text=self.tokenizer.decode(out, skip_special_tokens=True),
            finish_reason=reason, num_prompt_tokens=len(prompt), num_cached_prompt_tokens=cached,
            num_output_tokens=n, ttft_s=0.001 * (1 + len(prompt) % 5),
            tpot_s=0.0005 * (1 + n % 3) if n > 1 else None, latency_s=0.001 * (2 + n))

    def generate(self, requests: Iterable) -> Iterator[GenerationResult]:
        window = []
        iterator = iter(requests)
        while True:
            exhausted = False
            while len(window) < WINDOW:
                try:
                    window.append(next(iterator))
                except StopIteration:
                    exhausted = True
                    break
            order = list(range(len(window)))
            random.Random(len(window) * 1000 + sum(hash(r.request_id) % 997 for r in window)) \
                .shuffle(order)
            for i in order:
                if self.delay_s:
                    time.sleep(self.delay_s)
                yield self._finish(window[i])
            window = []
            if exhausted:
                return

    def stats(self) -> dict:
        return dict(self._stats)
