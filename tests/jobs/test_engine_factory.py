"""jobs/engine_factory.make_engine: what a failing engine factory becomes for API callers. A
custom factory's error is a JobError: OSError/ValueError as for the runtime's own load ('cannot
load the model', exit 2: a factory loads the model), anything else naming the factory (exit 1;
a user-acceptance test found its RuntimeError escaping bare)."""

import pytest

from llmbatch import run_job
from llmbatch.jobs.errors import InternalError, InvalidJobError


@pytest.mark.parametrize("exc, kind, message", [
    (RuntimeError("boom"), InternalError, "engine_factory failed: RuntimeError: boom"),
    (KeyError("weights"), InternalError, "engine_factory failed: KeyError: 'weights'"),
    (ValueError("bad\nsecond line"), InvalidJobError,
     "model.path {model}: cannot load the model: bad"),
])
def test_a_custom_factory_error_is_a_job_error_naming_the_factory(tmp_path, tiny_tokenizer_dir,
                                                                 jobkit, exc, kind, message):
    def factory(config):
        raise exc

    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 2)
    with pytest.raises(kind) as info:
        run_job(jobkit.make_job(tiny_tokenizer_dir, inp, str(tmp_path / "out")),
                engine_factory=factory)
    assert info.value.message == message.format(model=tiny_tokenizer_dir)
    assert info.value.exit_code == kind.exit_code
    assert not (tmp_path / "out").exists()
