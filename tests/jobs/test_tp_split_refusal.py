"""A model whose shape does not split over parallel.tensor_parallel_size is refused naming that
key (exit 2), not as a model that "cannot load", and an intermediate size that does not split
is named as such (it read "merged output size=130")."""

import pytest

from llmbatch import run_job
from llmbatch.jobs.errors import InvalidJobError


def test_heads_that_do_not_split_blame_the_tp_size(tmp_path, tiny_llama_dir, jobkit,
                                                    monkeypatch):
    monkeypatch.delenv("LLMBATCH_ENGINE_FACTORY", raising=False)
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 2)
    job = jobkit.make_job(tiny_llama_dir, inp, str(tmp_path / "out"),
                          engine={"device": "cpu"}, parallel={"tensor_parallel_size": 3})
    with pytest.raises(InvalidJobError) as info:
        run_job(job)
    assert (info.value.exit_code, info.value.message) == (
        2, "parallel.tensor_parallel_size: num_attention_heads=4 is not divisible by "
           "tensor_parallel_size=3")
    assert not (tmp_path / "out").exists()


def test_an_intermediate_size_that_does_not_split_is_named():
    from transformers import LlamaConfig

    from llmbatch.runtime.layers.linear import TensorParallelSplitError
    from llmbatch.runtime.models import build_model

    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=130,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(TensorParallelSplitError, match="^intermediate_size=130 is not "
                                                       "divisible by tensor_parallel_size=4$"):
        build_model(config, "float32", "meta", 0, 4)
