"""model.continue_final_message (vLLM's LLM.chat option): a messages row's last message is left
open for the model to continue (a begun assistant answer), instead of a new assistant turn."""

import pyarrow as pa
import pytest
from transformers import AutoTokenizer

from llmbatch.api import load
from llmbatch.io.prompts import PromptRenderer
from llmbatch.jobs.errors import InvalidJobError
from llmbatch.jobs.spec import InputSection, ModelSection

# Ends every turn with an end-of-turn token, as real templates do: an open message has none.
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
MESSAGES = [{"role": "user", "content": "two plus two"},
            {"role": "assistant", "content": "The answer is"}]
BASE = {"model": {"path": "m"}, "input": {"path": "x.parquet", "messages_column": "messages"},
        "output": {"path": "o"}}


def rendered(tiny_tokenizer_dir, **model) -> str:
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.chat_template = TEMPLATE
    renderer = PromptRenderer(tok, ModelSection(path="m", **model),
                              InputSection(path="x", messages_column="messages"))
    ids, error = renderer.render(pa.record_batch({"messages": [MESSAGES]}))[0]
    assert error is None
    return tok.decode(ids)


def test_the_last_message_is_continued(tiny_tokenizer_dir):
    assert rendered(tiny_tokenizer_dir, continue_final_message=True) == \
        "<|user|>two plus two<|end|>\n<|assistant|>The answer is"
    # Off (the default): a closed assistant turn, then a new one.
    assert rendered(tiny_tokenizer_dir) == \
        "<|user|>two plus two<|end|>\n<|assistant|>The answer is<|end|>\n<|assistant|>"


def test_needs_messages_and_leaves_the_hash_alone_when_off():
    plain = load(BASE).config_hash(1)
    assert load({**BASE, "model": {"path": "m", "continue_final_message": False}}) \
        .config_hash(1) == plain
    assert load({**BASE, "model": {"path": "m", "continue_final_message": True}}) \
        .config_hash(1) != plain
    job = {**BASE, "input": {"path": "x.parquet"},
           "model": {"path": "m", "continue_final_message": True}}
    with pytest.raises(InvalidJobError) as info:
        load(job)
    assert info.value.message == (
        "model.continue_final_message continues each row's last message and needs "
        "input.messages_column (rows of messages ending in the assistant's begun answer)")
