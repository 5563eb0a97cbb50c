"""models/llama.py LlamaSpec.from_config: the checks on a config's sizes, for a config passed in
directly (transformers validates the ones it loads itself; loader.load_hf_config reports those)."""

import pytest


@pytest.mark.parametrize("key, value", [("num_attention_heads", 0), ("hidden_size", -64),
                                        ("num_hidden_layers", None), ("vocab_size", True),
                                        ("num_key_value_heads", -2)])
def test_llama_spec_refuses_a_non_positive_size(key, value):
    """A config passed in directly (not validated by transformers on the way) fails with a
    ValueError naming the key, not a ZeroDivisionError deep in the model build."""
    from types import SimpleNamespace

    from llmbatch.runtime.models.llama import LlamaSpec

    fields = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2)
    fields[key] = value
    with pytest.raises(ValueError, match=f"^config {key}={value!r}: expected a positive "
                                         f"integer$"):
        LlamaSpec.from_config(SimpleNamespace(**fields), "llama")
