"""Prompt rendering: plain text, chat messages, templates auto/none/file, row errors."""

import pyarrow as pa
import pytest
from transformers import AutoTokenizer

from llmbatch.io.prompts import PromptRenderer, check_columns
from llmbatch.jobs.errors import InvalidInputError, InvalidJobError
from llmbatch.jobs.spec import InputSection, ModelSection


@pytest.fixture
def tok(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture
def plain_tok(tiny_tokenizer_no_template_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_no_template_dir)


def renderer(tok, **kw):
    model = ModelSection(path="m", **{k: v for k, v in kw.items()
                                      if k in ("chat_template", "system_prompt")})
    inp = InputSection(path="x", **{k: v for k, v in kw.items() if k == "messages_column"})
    return PromptRenderer(tok, model, inp)


def ids_of(tok, text, special):
    return tok(text, add_special_tokens=special)["input_ids"]


def test_plain_prompt_is_wrapped_as_user_message_when_template_exists(tok):
    out = renderer(tok).render(pa.record_batch({"prompt": ["hello world", "cat"]}))
    assert out[0] == (ids_of(tok, "<s><|user|>hello world\n<|assistant|>", False), None)
    assert out[1] == (ids_of(tok, "<s><|user|>cat\n<|assistant|>", False), None)


def test_system_prompt(tok):
    out = renderer(tok, system_prompt="be brief").render(pa.record_batch({"prompt": ["hi"]}))
    assert out[0][0] == ids_of(tok, "<s><|system|>be brief\n<|user|>hi\n<|assistant|>", False)


def test_template_none_uses_text_as_is(tok):
    out = renderer(tok, chat_template="none").render(pa.record_batch({"prompt": ["hello"]}))
    assert out[0] == (ids_of(tok, "hello", True), None)


def test_template_file(tok, tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    out = renderer(tok, chat_template=str(path)).render(pa.record_batch({"prompt": ["dog"]}))
    assert out[0][0] == ids_of(tok, "[dog]", False)


def test_messages_column_and_row_errors(tok):
    rows = [
        [{"role": "user", "content": "one"}],
        [{"role": "system", "content": "s"}, {"role": "user", "content": "two"}],
        None,
        [],
        [{"role": "user"}],
    ]
    batch = pa.record_batch({"msgs": pa.array(rows, type=pa.list_(pa.struct(
        [("role", pa.string()), ("content", pa.string())])))})
    out = renderer(tok, messages_column="msgs", system_prompt="dflt").render(batch)
    assert out[0] == (ids_of(tok, "<s><|system|>dflt\n<|user|>one\n<|assistant|>", False), None)
    assert out[1] == (ids_of(tok, "<s><|system|>s\n<|user|>two\n<|assistant|>", False), None)
    assert out[2] == (None, "msgs is null")
    assert out[3] == (None, "messages do not render: ValueError: messages must be a non-empty "
                            "list of {role, content}")
    # A message without content is "" (vLLM takes a null content as no parts).
    assert out[4] == (None, "msgs has only empty contents")


def test_null_and_empty_prompts_are_row_errors(tok):
    out = renderer(tok).render(pa.record_batch({"prompt": ["ok", None, ""]}))
    assert out[0][1] is None
    assert out[1:] == [(None, "prompt is null"), (None, "prompt is empty")]


def test_batched_tokenization_matches_one_by_one(plain_tok):
    texts = ["the cat sat", "one two three four", "a"]
    out = renderer(plain_tok).render(pa.record_batch({"prompt": texts}))
    assert [ids for ids, _ in out] == [ids_of(plain_tok, t, True) for t in texts]


def test_templates_that_cannot_exist_are_job_errors(plain_tok, tok):
    with pytest.raises(InvalidJobError, match="input.messages_column needs a chat template"):
        renderer(plain_tok, messages_column="m")
    with pytest.raises(InvalidJobError, match="model.system_prompt needs a chat template"):
        renderer(plain_tok, system_prompt="x")
    with pytest.raises(InvalidJobError, match="model.chat_template: file not found: nope.jinja"):
        renderer(tok, chat_template="nope.jinja")


def test_check_columns():
    schema = pa.schema([("prompt", pa.string()), ("n", pa.int64())])
    check_columns(schema, InputSection(path="x", keep_columns=["n"]), ["n"])
    with pytest.raises(InvalidInputError, match="input.id_column: column 'uid' not in input "
                                                 r"\(columns: prompt, n\)"):
        check_columns(schema, InputSection(path="x", id_column="uid"), [])
    with pytest.raises(InvalidInputError, match="input.prompt_column 'n' has type int64"):
        check_columns(schema, InputSection(path="x", prompt_column="n"), [])
    with pytest.raises(InvalidInputError, match="sampling.per_row: column 'temperature'"):
        check_columns(schema, InputSection(path="x"), ["temperature"])


@pytest.mark.parametrize("item", [pa.string(), pa.int64(), pa.list_(pa.string())])
def test_a_messages_column_of_other_lists_is_refused_up_front(item):
    """list<string> made every row its own error row; a list of structs or maps (or of nulls
    only, as an empty JSON list reads) stays a row-by-row matter."""
    kind = pa.list_(item)
    schema = pa.schema([("m", kind)])
    with pytest.raises(InvalidInputError) as info:
        check_columns(schema, InputSection(path="x", messages_column="m"), [])
    assert info.value.message == (f"input.messages_column 'm' has type {kind}, expected a list "
                                  f"of {{role, content}} (for a column of prompt strings, use "
                                  f"input.prompt_column)")
    for fine in (pa.struct([("role", pa.string()), ("content", pa.string())]),
                 pa.map_(pa.string(), pa.string()), pa.null()):
        check_columns(pa.schema([("m", pa.large_list(fine))]),
                      InputSection(path="x", messages_column="m"), [])


BROKEN_TEMPLATE = "{% for m in messages %}{{ m.content }\n"


def test_template_file_that_does_not_compile_is_a_job_error(tok, tmp_path):
    # It used to make every row an error (TemplateSyntaxError per row, exit 3).
    path = tmp_path / "bad.jinja"
    path.write_text(BROKEN_TEMPLATE)
    with pytest.raises(InvalidJobError) as info:
        renderer(tok, chat_template=str(path))
    assert info.value.message == (f"model.chat_template {path}: the template does not compile "
                                  f"at line 1: TemplateSyntaxError: unexpected '}}'")


def test_tokenizer_template_that_does_not_compile_is_a_job_error(tiny_tokenizer_dir):
    broken = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    broken.chat_template = "hello\n" + BROKEN_TEMPLATE
    with pytest.raises(InvalidJobError) as info:
        renderer(broken)
    assert info.value.message == (
        "model.chat_template auto: the tokenizer's chat template does not compile at line 2: "
        "TemplateSyntaxError: unexpected '}'")
    assert renderer(broken, chat_template="none").template is None   # not used: not checked


def test_a_string_view_prompt_column_is_text(tok):
    """Arrow's string_view (Polars and other Arrow 15+ writers) was refused as 'expected
    string'; kept columns of it already worked."""
    schema = pa.schema([("prompt", pa.string_view())])
    check_columns(schema, InputSection(path="x"), [])
    batch = pa.record_batch({"prompt": pa.array(["hello there", None]).cast(pa.string_view())})
    plain = pa.record_batch({"prompt": pa.array(["hello there", None])})
    assert renderer(tok).render(batch) == renderer(tok).render(plain)
