"""Messages whose content is a list of OpenAI-style parts ({"type": "text", "text": ...}), as
vLLM's LLM.chat and the OpenAI API take them: the text parts joined with "\\n" are the
content, as vLLM renders them for a template that expects text. Every such row was an error
row ("each message needs string 'role' and 'content'"), so a dataset in that format ran no row
at all. A part that is not text (an image) is that row's error, naming the type."""

import pyarrow as pa
import pytest
from transformers import AutoTokenizer

from llmbatch.io.content_parts import text_messages
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
    # A text part whose text is null is skipped (vLLM's rule), leaving no content here.
    assert out[2] == (None, "msgs has only empty contents")
    assert out[3][1] is None


def test_the_message_forms_vllm_takes():
    """Each of these was an error row; vLLM's chat_utils takes them (helper review): string
    parts, the Responses API's input_text / output_text parts, a refusal part, a null content
    (an assistant message beside its tool_calls) and an empty list of parts."""
    got = text_messages([
        {"role": "user", "content": ["a", {"type": "input_text", "text": "b"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "c"}]},
        {"role": "user", "content": []},
        {"role": "assistant", "content": None, "tool_calls": []},
        {"role": "user", "content": [{"type": "refusal", "refusal": "d", "text": None}]}])
    assert [m["content"] for m in got] == ["a\nb", "c", "", "", "d"]
    assert got[3]["tool_calls"] == []
    with pytest.raises(ValueError, match="a content part must be a string or a mapping"):
        text_messages([{"role": "user", "content": [3]}])
    with pytest.raises(ValueError, match="a refusal content part needs a string 'refusal'"):
        text_messages([{"role": "user", "content": [{"type": "refusal", "refusal": 3}]}])


def test_messages_stored_as_maps_render_like_structs(tok):
    """Spark writes Python dicts as MapType: list<map<string, string>> read as lists of
    (key, value) pairs, and every row was an error row."""
    rows = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "ho"}]]
    as_maps = pa.array([[list(m.items()) for m in row] for row in rows],
                       type=pa.list_(pa.map_(pa.string(), pa.string())))
    renderer = PromptRenderer(tok, ModelSection(path="m"),
                              InputSection(path="x", messages_column="msgs"))
    got = renderer.render(pa.record_batch({"msgs": as_maps}))
    assert got == renderer.render(pa.record_batch({"msgs": pa.array(rows)}))
    assert all(ids and error is None for ids, error in got)
