"""Messages whose content is a list of OpenAI-style parts ({"type": "text", "text": ...}), as
vLLM's LLM.chat and the OpenAI API take them: the text parts joined with "\\n" are the
content, as vLLM renders them for a template that expects text. Every such row was an error
row ("each message needs string 'role' and 'content'"), so a dataset in that format ran no row
at all. A part that is not text (an image) is that row's error, naming the type."""

import pyarrow as pa
import pytest
from transformers import AutoTokenizer

from llmbatch.io.prompts import PromptRenderer
from llmbatch.jobs.spec import InputSection, ModelSection

PART = pa.struct([("type", pa.string()), ("text", pa.string()),
                  ("image_url", pa.struct([("url", pa.string())]))])
MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.list_(PART))]))


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def _render(tok, rows, system_prompt=None):
    renderer = PromptRenderer(tok, ModelSection(path="m", system_prompt=system_prompt),
                              InputSection(path="x", messages_column="msgs"))
    return renderer.render(pa.record_batch({"msgs": pa.array(rows, type=MESSAGES)}))


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _text(text):
    return {"type": "text", "text": text}


def test_text_parts_are_joined_with_newlines(tok):
    out = _render(tok, [
        [{"role": "user", "content": [_text("red fox")]}],
        [{"role": "system", "content": [_text("be brief")]},
         {"role": "user", "content": [_text("one"), _text("two")]}],
    ])
    assert out[0] == (_ids(tok, "<s><|user|>red fox\n<|assistant|>"), None)
    assert out[1] == (_ids(tok, "<s><|system|>be brief\n<|user|>one\ntwo\n<|assistant|>"), None)


def test_system_prompt_before_parts(tok):
    out = _render(tok, [[{"role": "user", "content": [_text("hi")]}]], system_prompt="s")
    assert out[0] == (_ids(tok, "<s><|system|>s\n<|user|>hi\n<|assistant|>"), None)


def test_image_part_and_empty_parts_are_row_errors(tok):
    image = {"type": "image_url", "image_url": {"url": "http://x/cat.png"}}
    out = _render(tok, [
        [{"role": "user", "content": [_text("what is this"), image]}],
        [{"role": "user", "content": [_text("")]}],
        [{"role": "user", "content": [{"type": "text", "text": None}]}],
        [{"role": "user", "content": [_text("ok")]}],
    ])
    assert out[0] == (None, "messages do not render: ValueError: a content part of type "
                            "'image_url' is not text; only text parts are supported")
    assert out[1] == (None, "msgs has only empty contents")
    assert out[2] == (None, "messages do not render: ValueError: a text content part needs "
                            "a string 'text'")
    assert out[3][1] is None
