"""sampling.top_k 0 and -1 both turn top-k off (runtime/sampler.py keeps every token for
top_k <= 0, as vLLM does), but hashed as written they gave one job two config hashes: a job
resumed with the other spelling was refused. 0 is now stored as -1 when the job loads (job
section and per-row values alike), so both share -1's hash, which stays what it was.

engine.max_model_len 0 is left as it is: it has a meaning (the model's own length, like null;
README) and its own pinned hash (test_spec_runtime_limits.py), since folders written with it
must resume."""

import pytest

from llmbatch.jobs.loader import load_job
from llmbatch.jobs.sampling_values import row_value

# Computed at 9d0bba6 (before 0 was mapped onto -1) with load_job(job(...)).config_hash(1):
# -1 (and the default) d297b170443a6235, 40 21972764e232a68d; 0 was 8f94dc7df64525b1.
# Under output rules v4 (config_hash.OUTPUT_RULES_VERSION); the v3 values above.
HASH_TOP_K_OFF = "55baa8944f886328"
HASH_TOP_K_40 = "a5028b14cfdbe85a"


def job(**sections):
    data = {"model": {"path": "m"}, "input": {"path": "in.parquet"}, "output": {"path": "out"}}
    data.update(sections)
    return data


@pytest.mark.parametrize("sampling", [{}, {"top_k": -1}, {"top_k": 0}])
def test_top_k_off_has_one_spelling_and_the_hash_it_had(sampling):
    spec = load_job(job(sampling=sampling))
    assert spec.sampling.top_k == -1
    assert spec.config_hash(1) == HASH_TOP_K_OFF
    assert spec.hashed_settings(1)["sampling"]["top_k"] == -1


def test_a_positive_top_k_keeps_its_hash():
    spec = load_job(job(sampling={"top_k": 40}))
    assert (spec.sampling.top_k, spec.config_hash(1)) == (40, HASH_TOP_K_40)


def test_top_k_0_by_set_is_stored_as_minus_1():
    spec = load_job(job(), ["sampling.top_k=0"])
    assert (spec.sampling.top_k, spec.config_hash(1)) == (-1, HASH_TOP_K_OFF)


@pytest.mark.parametrize("value", [0, 0.0, -1, -1.0])
def test_a_per_row_top_k_off_is_minus_1(value):
    spec = load_job(job(sampling={"top_k": 40, "per_row": ["top_k"]}))
    assert row_value("top_k", value) == -1
    assert spec.sampling_params({"top_k": value}).top_k == -1


def test_a_per_row_top_k_below_minus_1_is_still_a_row_error():
    with pytest.raises(ValueError) as info:
        row_value("top_k", -2)
    assert str(info.value) == "top_k must be -1 or 0 (off) or a positive number of tokens, got -2"


def test_a_folder_written_when_top_k_0_was_hashed_as_written_still_resumes(
        tmp_path, tiny_tokenizer_dir, jobkit, fake_engine_env):
    """A folder from before 6585e66 (top_k: 0 recorded and hashed as 0, hash 8f94dc7d... for
    this job shape) resumes with either spelling: the runner adopts the folder's hash
    (config_hash.folder_spelling) and the new entries carry it too; a job that really differs
    is still refused."""
    import glob
    import json
    import os

    from llmbatch import run_job
    from llmbatch.jobs.config_hash import settings_hash
    from llmbatch.jobs.errors import ResumeError

    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 30)
    out = str(tmp_path / "out")
    job = lambda **s: jobkit.make_job(tiny_tokenizer_dir, inp, out,  # noqa: E731
                                      output={"rows_per_part": 10}, **s)
    run_job(job(sampling={"top_k": 0}))
    manifest = sorted(glob.glob(os.path.join(out, "_manifest", "*.json")))
    assert len(manifest) == 3
    legacy = None
    for path in manifest:      # as the earlier llmbatch wrote them: top_k 0, hashed as such
        with open(path) as f:
            entry = json.load(f)
        entry["settings"]["sampling"]["top_k"] = 0
        legacy = entry["config_hash"] = settings_hash(entry["settings"])
        with open(path, "w") as f:
            json.dump(entry, f)
    os.remove(manifest[-1])    # the last part uncommitted: the resume has rows to write
    for spelling in (0, -1):
        result = run_job(job(sampling={"top_k": spelling}))
        assert (result.config_hash, result.num_rows_skipped) == (legacy, 20)
        entries = [json.load(open(p)) for p in sorted(
            glob.glob(os.path.join(out, "_manifest", "*.json")))]
        assert [e["config_hash"] for e in entries] == [legacy] * 3
        os.remove(sorted(glob.glob(os.path.join(out, "_manifest", "*.json")))[-1])
    with pytest.raises(ResumeError, match=r"sampling.top_k 0 -> 40"):
        run_job(job(sampling={"top_k": 40}))
