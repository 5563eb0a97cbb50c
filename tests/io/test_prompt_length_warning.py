"""transformers' "Token indices sequence length is longer than the specified maximum sequence
length" leaked to stderr on long prompts; those rows are error rows anyway (length_error), so the
job silences that one warning for its tokenizer, and nothing else."""

import logging

import pyarrow as pa
import pytest
from transformers import AutoTokenizer

from llmbatch.io.prompts import PromptRenderer
from llmbatch.jobs.spec import InputSection, ModelSection


@pytest.fixture
def records():
    """What transformers logs (its root logger does not propagate; its own handler holds the
    sys.stderr of whichever test configured it first, so capfd does not see it)."""
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    root = logging.getLogger("transformers")
    root.addHandler(handler)
    yield seen
    root.removeHandler(handler)


def test_long_prompts_do_not_print_the_tokenizer_length_warning(tiny_tokenizer_dir, records):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.model_max_length = 8
    renderer = PromptRenderer(tok, ModelSection(path="m"), InputSection(path="x"))
    long_prompt = " ".join(["hello world"] * 50)
    [(ids, error)] = renderer.render(pa.record_batch({"prompt": [long_prompt]}))
    assert error is None and len(ids) > 8      # still tokenized whole; the runner rejects it
    assert not [m for m in records if m.startswith("Token indices")]


def test_other_tokenizer_warnings_still_show(tiny_tokenizer_dir, records):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    PromptRenderer(tok, ModelSection(path="m"), InputSection(path="x"))
    logging.getLogger("transformers.tokenization_utils_base").warning("another warning")
    assert records == ["another warning"]
