"""Shared fixtures: a tiny byte-level BPE tokenizer with a chat template, a tiny Llama checkpoint,
and a helper to run jobs on the deterministic fake engine.

Everything is built locally (no model hub): the tokenizer is trained with `tokenizers` on
generated text; the model is a random-initialised LlamaForCausalLM saved in float32.
"""

from __future__ import annotations

import os
import random

import pytest

# Without CUDA, Triton kernels run in the interpreter. The switch is read when a kernel module
# is first imported, and transformers may import triton while collecting any test module, so
# it is set here, before any test module is imported.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover - torch is a hard dependency
    pass

# Jinja chat template of the tiny tokenizer: <s><|role|>content\n ... <|assistant|>
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_WORDS = ("the a cat dog sat on mat red blue green one two three four five six seven eight nine "
          "ten copy answer question what is why how system user assistant hello world data "
          "batch prompt model token output input and or not yes no").split()


def corpus(n_lines: int = 2000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12)))
            for _ in range(n_lines)]


def build_tokenizer(path: str, with_template: bool = True, vocab_size: int = 384) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  special_tokens=["<s>", "</s>", "<pad>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")
    if with_template:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """The runtime tests' tiny tokenizer object (tests/runtime/tiny_models.make_tokenizer),
    built once per session for every engine test module that takes `tokenizer`."""
    from tests.runtime.tiny_models import make_tokenizer

    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> str:
    """A fast tokenizer (byte-level BPE, <s> </s> <pad> <unk>) with CHAT_TEMPLATE set."""
    return build_tokenizer(str(tmp_path_factory.mktemp("tiny_tokenizer")))


@pytest.fixture(scope="session")
def tiny_tokenizer_no_template_dir(tmp_path_factory) -> str:
    return build_tokenizer(str(tmp_path_factory.mktemp("tiny_tokenizer_plain")),
                           with_template=False)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer_dir) -> str:
    """Tiny random Llama (hidden 64, 2 layers, 4 heads, 2 KV heads) + the tiny tokenizer,
    saved with save_pretrained in float32."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = str(tmp_path_factory.mktemp("tiny_llama"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


FAKE_ENGINE = "llmbatch.jobs.fake_engine:FakeEngine"


@pytest.fixture
def fake_engine_env(monkeypatch):
    """Route jobs run in this process (and subprocesses inheriting os.environ) to the fake."""
    monkeypatch.setenv("LLMBATCH_ENGINE_FACTORY", FAKE_ENGINE)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")      # no hub here: never wait on retries
    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN"):
        monkeypatch.delenv(name, raising=False)
    return FAKE_ENGINE


def write_prompts(path: str, n: int, seed: int = 0, **extra_columns) -> str:
    """Parquet of n prompts ('prompt' column, plus `extra_columns` name -> list)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    prompts = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 10))) for _ in range(n)]
    columns = {"prompt": prompts, **extra_columns}
    pq.write_table(pa.table(columns), path)
    return path


def make_job(tokenizer_dir: str, input_path, output_path: str, **sections) -> dict:
    """A minimal job dict for the fake engine; `sections` are merged per section."""
    job = {"model": {"path": tokenizer_dir}, "input": {"path": input_path},
           "output": {"path": output_path},
           "sampling": {"max_new_tokens": 8}}
    for key, value in sections.items():
        if isinstance(value, dict):
            job.setdefault(key, {}).update(value)
        else:
            job[key] = value
    return job


@pytest.fixture(scope="session")
def jobkit():
    """Helpers for job tests (test modules cannot import conftest directly)."""
    import types

    return types.SimpleNamespace(make_job=make_job, write_prompts=write_prompts,
                                 build_tokenizer=build_tokenizer, fake_engine=FAKE_ENGINE)
