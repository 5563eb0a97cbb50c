"""model.chat_template_kwargs: extra variables of the chat template (Qwen3's enable_thinking)."""

import copy

import pyarrow as pa
import pytest
from transformers import AutoTokenizer

from llmbatch.io.prompts import PromptRenderer
from llmbatch.jobs.errors import InvalidJobError
from llmbatch.jobs.loader import load_job
from llmbatch.jobs.spec import InputSection, ModelSection

# Branches as Qwen3's template does: an empty think block when thinking is off.
THINKING_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>"
    "{% if enable_thinking is defined and enable_thinking is false %}<think></think>{% endif %}"
    "{% endif %}")
BASE = {"model": {"path": "m"}, "input": {"path": "x.parquet"}, "output": {"path": "o"}}


@pytest.fixture
def tok(tiny_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tokenizer.chat_template = THINKING_TEMPLATE
    return tokenizer


def rendered(tok, column="prompt", value="hi", **model):
    renderer = PromptRenderer(tok, ModelSection(path="m", **model),
                              InputSection(path="x", messages_column=None if column == "prompt"
                                           else column))
    ids, error = renderer.render(pa.record_batch({column: [value]}))[0]
    assert error is None
    return tok.decode(ids)


def test_kwargs_reach_the_template_for_prompts_and_messages(tok):
    assert rendered(tok) == "<|user|>hi\n<|assistant|>"
    off = {"enable_thinking": False}
    assert rendered(tok, chat_template_kwargs=off) == "<|user|>hi\n<|assistant|><think></think>"
    assert rendered(tok, "messages", [{"role": "user", "content": "hi"}],
                    chat_template_kwargs=off, system_prompt="s") == \
        "<|system|>s\n<|user|>hi\n<|assistant|><think></think>"


def test_kwargs_need_a_chat_template(tok):
    # chat_template none with kwargs is refused when the job loads
    # (tests/jobs/test_template_none_refusals.py); here the tokenizer has no template.
    tok.chat_template = None
    with pytest.raises(InvalidJobError) as info:
        rendered(tok, chat_template_kwargs={"enable_thinking": False})
    assert str(info.value) == ("model.chat_template_kwargs needs a chat template but the "
                               "tokenizer has none (or model.chat_template is none)")


def job(**model):
    data = copy.deepcopy(BASE)
    data["model"].update(model)
    return data


def error_of(data, **kw):
    with pytest.raises(InvalidJobError) as info:
        load_job(data, **kw)
    assert "\n" not in str(info.value) and info.value.exit_code == 2
    return str(info.value)


@pytest.mark.parametrize("kwargs, message", [
    (["enable_thinking"],
     "model.chat_template_kwargs: expected a mapping, got ['enable_thinking']"),
    ({1: True}, "model.chat_template_kwargs: keys must be strings, got 1"),
    # Arguments of apply_chat_template itself would clash with ours or change what it returns.
    ({"tokenize": True}, "model.chat_template_kwargs: 'tokenize' is an argument of "
                         "apply_chat_template, not a template variable (got {'tokenize': True})"),
    ({"messages": []}, "model.chat_template_kwargs: 'messages' is an argument of "
                       "apply_chat_template, not a template variable (got {'messages': []})"),
])
def test_kwargs_are_a_mapping_of_template_variables(kwargs, message):
    assert error_of(job(chat_template_kwargs=kwargs)) == message


def test_kwargs_load_from_set_and_change_the_config_hash():
    spec = load_job(job(), sets=["model.chat_template_kwargs={enable_thinking: false}"])
    assert spec.model.chat_template_kwargs == {"enable_thinking": False}
    default = load_job(job())
    assert default.model.chat_template_kwargs == {}
    assert spec.config_hash(1) != default.config_hash(1)
    # Left out of dumps while empty: jobs written before the key keep their config hash.
    assert "chat_template_kwargs" not in default.model.model_dump()
