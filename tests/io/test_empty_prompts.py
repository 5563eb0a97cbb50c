"""One rule for empty prompts, plain and messages alike: a prompt is empty (an error row) only
if it is "" (for messages: every content is "") or it renders to no tokens; whitespace is text
and runs as is, as vLLM and transformers take it. A plain "   " was an error row "prompt is
empty" (even with a chat template that renders it), while messages whose content was "   " or
"" ran."""

import pyarrow as pa
import pytest
from transformers import AutoTokenizer

from llmbatch.io.prompts import PromptRenderer
from llmbatch.jobs.spec import InputSection, ModelSection


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def _render(tok, values, chat_template="auto", messages_column=None):
    renderer = PromptRenderer(tok, ModelSection(path="m", chat_template=chat_template),
                              InputSection(path="x", messages_column=messages_column))
    if messages_column is None:
        return renderer.render(pa.record_batch({"prompt": values}))
    kind = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    return renderer.render(pa.record_batch({messages_column: pa.array(values, type=kind)}))


def _ids(tok, text, special):
    return tok(text, add_special_tokens=special)["input_ids"]


@pytest.mark.parametrize("chat_template", ["auto", "none"])
def test_whitespace_plain_prompts_run_and_only_the_empty_string_is_empty(tok, chat_template):
    out = _render(tok, ["   ", "\n", ""], chat_template)
    if chat_template == "auto":
        assert out[0] == (_ids(tok, "<s><|user|>   \n<|assistant|>", False), None)
        assert out[1] == (_ids(tok, "<s><|user|>\n\n<|assistant|>", False), None)
    else:
        assert out[0] == (_ids(tok, "   ", True), None) and out[0][0]
        assert out[1] == (_ids(tok, "\n", True), None) and out[1][0]
    assert out[2] == (None, "prompt is empty")


def test_messages_follow_the_same_rule(tok):
    out = _render(tok, [[{"role": "user", "content": "   "}],
                        [{"role": "user", "content": ""}],
                        [{"role": "system", "content": ""}, {"role": "user", "content": ""}],
                        [{"role": "system", "content": "s"}, {"role": "user", "content": ""}]],
                  messages_column="msgs")
    assert out[0] == (_ids(tok, "<s><|user|>   \n<|assistant|>", False), None)
    assert out[1] == (None, "msgs has only empty contents")
    assert out[2] == (None, "msgs has only empty contents")
    assert out[3] == (_ids(tok, "<s><|system|>s\n<|user|>\n<|assistant|>", False), None)
