"""The four sampling keys added with the runtime's penalties and min_p leave every existing job's
config hash as it was: at their neutral values (repetition_penalty 1.0, presence_penalty,
frequency_penalty and min_p 0.0) they are left out of the hashed settings, so folders written
before them still resume. Any other value is hashed (and a refused resume names it, with the
neutral value for a folder that does not record the key); 1 and 1.0 are one value."""

import glob
import json
import os

import pytest

from llmbatch import run_job
from llmbatch.io.config_diff import describe_differences
from llmbatch.jobs.errors import ResumeError
from llmbatch.jobs.loader import load_job
from tests.jobs.test_top_k_hash import HASH_TOP_K_40, HASH_TOP_K_OFF, job

KEYS = ("repetition_penalty", "presence_penalty", "frequency_penalty", "min_p")
# load_job(job(sampling={"repetition_penalty": 1.2})).config_hash(1), at this change.
HASH_REPETITION_1_2 = "cc4efe6c4949d6d7"   # output rules v4 (v3: 1b2173229af87205)


@pytest.mark.parametrize("neutral", [
    {}, {"repetition_penalty": 1}, {"presence_penalty": -0.0},
    {"repetition_penalty": 1.0, "presence_penalty": 0, "frequency_penalty": 0.0, "min_p": 0},
])
def test_neutral_values_keep_the_pinned_hashes(neutral):
    spec = load_job(job(sampling=neutral))
    assert spec.config_hash(1) == HASH_TOP_K_OFF
    assert not set(KEYS) & set(spec.hashed_settings(1)["sampling"])
    assert load_job(job(sampling={**neutral, "top_k": 40})).config_hash(1) == HASH_TOP_K_40


def test_neutral_values_by_set_keep_the_pinned_hash():
    spec = load_job(job(), ["sampling.repetition_penalty=1", "sampling.min_p=0"])
    assert spec.config_hash(1) == HASH_TOP_K_OFF


def test_any_other_value_is_hashed():
    hashes = {HASH_TOP_K_OFF}
    for key, value in [("repetition_penalty", 1.2), ("repetition_penalty", 0.8),
                       ("presence_penalty", 0.5), ("presence_penalty", -0.5),
                       ("frequency_penalty", 0.5), ("min_p", 0.05)]:
        spec = load_job(job(sampling={key: value}))
        assert spec.hashed_settings(1)["sampling"][key] == value
        hashes.add(spec.config_hash(1))
    assert len(hashes) == 7
    assert load_job(job(sampling={"repetition_penalty": 1.2})).config_hash(1) == \
        HASH_REPETITION_1_2


def test_an_int_spelling_hashes_as_its_float():
    as_int, as_float = (load_job(job(sampling={"repetition_penalty": v, "min_p": m}))
                        for v, m in ((2, 1), (2.0, 1.0)))
    assert as_int.config_hash(1) == as_float.config_hash(1)
    assert json.dumps(as_int.hashed_settings(1)["sampling"]["repetition_penalty"]) == "2.0"


def test_a_difference_names_the_neutral_value_for_a_key_not_recorded():
    assert describe_differences({"sampling": {"seed": 0}},
                                {"sampling": {"seed": 0, "min_p": 0.05}}) == \
        "sampling.min_p 0.0 -> 0.05"
    assert describe_differences({"sampling": {"seed": 0, "repetition_penalty": 1.2}},
                                {"sampling": {"seed": 0}}) == \
        "sampling.repetition_penalty 1.2 -> 1.0"
    # Recorded at the neutral value by hand, or absent: the same.
    assert describe_differences({"sampling": {"seed": 0, "min_p": 0.0}},
                                {"sampling": {"seed": 0}}) == ""


def half_done_folder(tmp_path, tiny_tokenizer_dir, jobkit):
    """A 20-row job run with default sampling, its second part's manifest entry removed (as if
    preempted): (make(**sampling) -> that job with these sampling keys, input, output, the run)."""
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 20)
    out = str(tmp_path / "out")
    make = lambda **s: jobkit.make_job(tiny_tokenizer_dir, inp, out,  # noqa: E731
                                       output={"rows_per_part": 10}, sampling=s)
    first = run_job(make())
    os.remove(sorted(glob.glob(os.path.join(out, "_manifest", "*.json")))[-1])
    return make, inp, out, first


def test_a_folder_resumes_with_neutral_values_and_refuses_others_naming_them(
        tmp_path, tiny_tokenizer_dir, jobkit, fake_engine_env):
    make, inp, out, first = half_done_folder(tmp_path, tiny_tokenizer_dir, jobkit)
    again = run_job(make(repetition_penalty=1, presence_penalty=0, min_p=0.0))
    assert (again.config_hash, again.num_rows_skipped) == (first.config_hash, 10)
    with pytest.raises(ResumeError, match=r"sampling.repetition_penalty 1.0 -> 1.2"):
        run_job(make(repetition_penalty=1.2))
    run_job(jobkit.make_job(tiny_tokenizer_dir, inp, out, sampling={"min_p": 0.05},
                            output={"rows_per_part": 10, "mode": "overwrite"}))
    with pytest.raises(ResumeError, match=r"sampling.min_p 0.05 -> 0.0"):
        run_job(make())
