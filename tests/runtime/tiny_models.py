"""Tiny random Llama-family checkpoints for runtime tests (float32, saved with save_pretrained)."""

from __future__ import annotations

import random
from pathlib import Path

VOCAB = 384


def make_tokenizer(path: Path):
    """A byte-level BPE tokenizer trained on a few sentences; enough for decode and stop strings."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["the quick brown fox jumps over the lazy dog", "hello world", "héllo wörld 日本語"] * 50
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.save_pretrained(path)
    return fast


def make_model(path: Path, arch: str = "llama", *, tie: bool = False, num_heads: int = 4,
               num_kv_heads: int = 2, head_dim: int = 16, hidden: int = 64, layers: int = 2,
               seed: int = 0, eos_token_id: int = 2, rope_scaling=None):
    """Save a random model of `arch` (llama | mistral | qwen2 | qwen3) to `path`."""
    import torch
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=layers, num_attention_heads=num_heads,
                  num_key_value_heads=num_kv_heads, max_position_embeddings=512,
                  tie_word_embeddings=tie, bos_token_id=1, eos_token_id=eos_token_id,
                  pad_token_id=0)
    if arch == "llama":
        cfg = tf.LlamaConfig(head_dim=head_dim, rope_scaling=rope_scaling, **common)
        cls = tf.LlamaForCausalLM
    elif arch == "mistral":
        cfg = tf.MistralConfig(head_dim=head_dim, sliding_window=None, **common)
        cls = tf.MistralForCausalLM
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**common)  # Qwen2: head_dim = hidden / heads, q/k/v bias
        cls = tf.Qwen2ForCausalLM
    elif arch == "qwen3":
        cfg = tf.Qwen3Config(head_dim=head_dim, **common)
        cls = tf.Qwen3ForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(cfg).float().eval()
    # Bigger weights than the default init give peaked, non-degenerate greedy outputs.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(path, safe_serialization=True)
    return model


def make_prompts(n: int, seed: int = 0, num_prefixes: int = 4) -> list[list[int]]:
    """Mixed-length prompts; most share one of a few prefixes so the prefix cache is exercised."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(20, 50))]
                for _ in range(num_prefixes)]
    prompts = []
    for i in range(n):
        tail = [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 40))]
        prompts.append((prefixes[i % num_prefixes] + tail) if i % 5 else tail + [5])
    return prompts


def make_target_and_draft(tmp_path_factory) -> tuple[Path, Path, object]:
    """(target dir, draft dir, tokenizer): a tiny target and a different, smaller draft model
    with the same vocabulary (draft-model speculative decoding tests)."""
    target = tmp_path_factory.mktemp("target")
    draft = tmp_path_factory.mktemp("draft")
    make_model(target, arch="llama", seed=0)
    make_model(draft, arch="llama", seed=1, hidden=32, layers=1, num_heads=2, num_kv_heads=1)
    return target, draft, make_tokenizer(tmp_path_factory.mktemp("tok"))


class EchoLast:
    """A proposer (Engine.set_proposer) that always drafts k tokens, the last token repeated:
    a few accepted, most rejected, never none offered."""

    def propose(self, request, k):
        return [request.all_token_ids[-1]] * k


def new_engine(llama_setup, **engine_kwargs):
    """A CPU float32 Engine on the (model dir, tokenizer) of the `llama_setup` fixture."""
    from llmbatch.runtime.config import EngineConfig
    from llmbatch.runtime.engine import Engine

    path, tok = llama_setup
    return Engine(EngineConfig(model=str(path), device="cpu", dtype="float32", **engine_kwargs),
                  tokenizer=tok)


def generate(engine, reqs) -> dict:
    """Run requests to completion; results by request id."""
    return {r.request_id: r for r in engine.generate(reqs)}


def match_fraction(got: list[list[int]], want: list[list[int]]) -> float:
    """Tokens in common prefixes / tokens expected: a near-tie that flips one token costs the
    rest of that sequence, a real bug costs nearly every sequence after its first step."""
    same = 0
    for g, w in zip(got, want):
        for a, b in zip(g, w):
            if a != b:
                break
            same += 1
    return same / max(1, sum(len(w) for w in want))


def outputs_sync_async_and_small_batch(llama_setup, prompts, params) -> list[list[list[int]]]:
    """Output ids of every prompt under the default engine, async scheduling and
    max_num_seqs=3, in that order: seeded sampling must give the same three."""
    from llmbatch.runtime.request import Request

    runs = []
    for kwargs in (dict(), dict(async_scheduling=True), dict(max_num_seqs=3)):
        engine = new_engine(llama_setup, **kwargs)
        results = generate(engine, [Request(i, pr, pa) for i, (pr, pa) in
                                    enumerate(zip(prompts, params))])
        runs.append([results[i].output_token_ids for i in range(len(prompts))])
    return runs


# Scheduling settings an engine-level oracle test runs under (each must give the same tokens):
# chunked prefill with preemption (a pool of 12 blocks), async scheduling, n-gram speculation.
ENGINE_SETTINGS = {
    "default": dict(),
    "chunked-preemption": dict(kv_cache_blocks=12, max_num_batched_tokens=24),
    "async": dict(async_scheduling=True),
    "async-chunked-preemption": dict(async_scheduling=True, kv_cache_blocks=12,
                                     max_num_batched_tokens=24),
    "ngram-spec": dict(speculative_method="ngram", num_speculative_tokens=3,
                       speculative_max_num_seqs=64),
    "async-ngram-spec": dict(async_scheduling=True, speculative_method="ngram",
                             num_speculative_tokens=3, speculative_max_num_seqs=64),
}
