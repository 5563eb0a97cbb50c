"""A resume refused for its config hash says why, in one line: the settings that differ (each
manifest entry records the hashed settings), or that an earlier llmbatch version wrote the folder
(another output rules version, or entries that record no settings), and how many committed rows
output.mode: overwrite would delete. The refusal was the same opaque line for all of them
("was written by a job with config hash X, this job's is Y; set output.mode: overwrite")."""

import glob
import json
import os

import pytest

from llmbatch import run_job
from llmbatch.api import plan_job
from llmbatch.jobs.errors import ResumeError
from llmbatch.jobs.config_hash import OUTPUT_RULES_VERSION

HINT = "use another output.path, or set output.mode: overwrite (deletes the 50 committed rows)"


@pytest.fixture
def folder(tmp_path, tiny_tokenizer_dir, jobkit, fake_engine_env):
    """(out, job): out/ holds a finished 50-row job written with rows_per_part 50;
    job(**sections) is that job with `sections` merged in."""
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 50)
    out = str(tmp_path / "out")

    def job(**sections):
        output = {"rows_per_part": 50, **sections.pop("output", {})}
        return jobkit.make_job(tiny_tokenizer_dir, inp, out, output=output, **sections)

    run_job(job())
    return out, job


def refusal(job: dict) -> str:
    with pytest.raises(ResumeError) as info:
        run_job(job)
    assert info.value.exit_code == 2
    assert "\n" not in str(info.value)
    return str(info.value)


def edit_entries(out: str, edit) -> None:
    """Rewrite every manifest entry of `out` as edit(entry) returns it."""
    for path in glob.glob(os.path.join(out, "_manifest", "*.json")):
        with open(path) as f:
            entry = json.load(f)
        with open(path, "w") as f:
            json.dump(edit(entry), f)


def test_a_changed_setting_is_named_with_both_values(folder):
    out, job = folder
    message = refusal(job(output={"rows_per_part": 20}))
    assert message == (f"output.path {out} was written with different settings: "
                       f"output.rows_per_part 50 -> 20; rerun with the original settings, "
                       f"{HINT}")
    with pytest.raises(ResumeError) as info:       # `llmbatch plan` says the same
        plan_job(job(output={"rows_per_part": 20}))
    assert str(info.value) == message
    assert refusal(job(sampling={"max_new_tokens": 4}, model={"system_prompt": "be brief"})) \
        == (f"output.path {out} was written with different settings: model.system_prompt "
            f"null -> \"be brief\", sampling.max_new_tokens 8 -> 4; rerun with the original "
            f"settings, {HINT}")
    assert run_job(job()).num_rows_skipped == 50   # the original settings still resume


def test_entries_without_recorded_settings_are_an_earlier_version(folder):
    out, job = folder
    this = run_job(job()).config_hash
    edit_entries(out, lambda entry: {**{k: v for k, v in entry.items() if k != "settings"},
                                     "config_hash": "64bf29a9d049b198"})
    assert refusal(job()) == (
        f"output.path {out} was written by an earlier llmbatch version that does not record "
        f"its settings (config hash 64bf29a9d049b198, this job's is {this}); rerun it with "
        f"the llmbatch version that wrote it, {HINT}")


def test_another_output_rules_version_is_named(folder):
    out, job = folder
    assert OUTPUT_RULES_VERSION == 4
    edit_entries(out, lambda entry: {**entry, "config_hash": "0123456789abcdef",
                                     "settings": {**entry["settings"], "output_rules": 3}})
    assert refusal(job(output={"rows_per_part": 20})) == (
        f"output.path {out} was written by an earlier llmbatch version (output rules v3; this "
        f"version writes v4); rerun it with the llmbatch version that wrote it, {HINT}")


def test_a_shard_counts_only_the_rows_overwrite_would_delete(tmp_path, tiny_tokenizer_dir,
                                                             jobkit, fake_engine_env):
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 50)
    out = str(tmp_path / "out")
    for k in range(2):
        run_job(jobkit.make_job(tiny_tokenizer_dir, inp, out, output={"rows_per_part": 10},
                                shard={"index": k, "count": 2}))
    changed = jobkit.make_job(tiny_tokenizer_dir, inp, out, output={"rows_per_part": 10},
                              shard={"index": 0, "count": 2}, sampling={"temperature": 0.5})
    assert refusal(changed) == (
        f"output.path {out} was written with different settings: sampling.temperature 0.0 -> "
        f"0.5; rerun with the original settings, use another output.path, or set output.mode: "
        f"overwrite (deletes the 25 committed rows of shard 0)")
