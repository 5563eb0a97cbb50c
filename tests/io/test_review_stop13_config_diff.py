"""A refused resume names what differs with values a reader can tell apart (review, stop 13).

Two long values that differ after their first 37 characters (two input files in one long folder,
two model checkpoints) were both cut to the same text: 'input.path /data/.../... ->
/data/.../...' named the key but showed the same value twice. And an empty mapping inside the
settings (a chat_template_kwargs value {}) vanished when flattened: {a: {}} -> {a: []} read
'(unset) -> []', and {} -> {a: {}} found no difference at all and fell back to the opaque
config hashes ("the entry was edited by hand")."""

from llmbatch import run_job
from llmbatch.io.config_diff import describe_differences, why_written_differently
from llmbatch.jobs.config_hash import settings_hash
from llmbatch.jobs.errors import ResumeError

FOLDER = "/data/team/a_very_long_directory_name_for_the_inputs"


def test_long_values_cut_alike_are_shown_where_they_differ():
    old = {"input": {"path": f"{FOLDER}/prompts-2024-001.parquet"}}
    new = {"input": {"path": f"{FOLDER}/prompts-2024-002.parquet"}}
    assert describe_differences(old, new) == \
        "input.path .../prompts-2024-001.parquet -> .../prompts-2024-002.parquet"


def test_a_long_difference_after_the_cut_is_cut_again_at_the_end():
    old = {"model": {"path": "/models/" + "x" * 40 + "/llama-3.1-8b-instruct-checkpoint-1000"}}
    new = {"model": {"path": "/models/" + "x" * 40 + "/mistral-7b-instruct-checkpoint-2000"}}
    assert describe_differences(old, new) == (
        "model.path ...xxxxxxxxxxxxxxx/llama-3.1-8b-instr... -> "
        "...xxxxxxxxxxxxxxx/mistral-7b-instruc...")


def test_values_that_differ_within_the_cut_are_unchanged():
    old = {"model": {"system_prompt": "You are a very helpful assistant, answer briefly"}}
    new = {"model": {"system_prompt": None}}
    assert describe_differences(old, new) == \
        'model.system_prompt "You are a very helpful assistant, an... -> null'
    assert describe_differences({"output": {"rows_per_part": 50}},
                                {"output": {"rows_per_part": 20}}) == \
        "output.rows_per_part 50 -> 20"


def test_an_empty_mapping_is_a_value():
    kwargs = lambda value: {"model": {"path": "m", "chat_template_kwargs": {"a": value}}}  # noqa
    assert describe_differences(kwargs({}), kwargs([])) == \
        "model.chat_template_kwargs.a {} -> []"
    assert describe_differences({"model": {"path": "m"}}, kwargs({})) == \
        "model.chat_template_kwargs.a (unset) -> {}"
    assert describe_differences(kwargs({}), kwargs({})) == ""


def test_why_names_an_empty_mapping_instead_of_the_hashes():
    recorded = {"output_rules": 2, "model": {"path": "m"}}
    settings = {"output_rules": 2, "model": {"path": "m", "chat_template_kwargs": {"a": {}}}}
    entry = {"settings": recorded, "config_hash": settings_hash(recorded)}
    why, remedy = why_written_differently(entry, settings, settings_hash(settings))
    assert why == ("was written with different settings: "
                   "model.chat_template_kwargs.a (unset) -> {}")
    assert remedy == "rerun with the original settings"


def test_resume_refusal_shows_where_two_long_input_paths_differ(
        tmp_path, tiny_tokenizer_dir, jobkit, fake_engine_env):
    folder = tmp_path / "a_very_long_directory_name_for_the_inputs"
    folder.mkdir()
    first = jobkit.write_prompts(str(folder / "prompts-2024-001.parquet"), 6)
    second = jobkit.write_prompts(str(folder / "prompts-2024-002.parquet"), 6)
    out = str(tmp_path / "out")
    run_job(jobkit.make_job(tiny_tokenizer_dir, first, out))
    try:
        run_job(jobkit.make_job(tiny_tokenizer_dir, second, out))
    except ResumeError as exc:
        message = str(exc)
    else:
        raise AssertionError("the resume was not refused")
    assert ("was written with different settings: input.path "
            ".../prompts-2024-001.parquet -> .../prompts-2024-002.parquet; ") in message


def test_values_equal_in_python_but_not_in_the_hash_are_named():
    # True == 1 == 1.0 in Python, but the hash (JSON) tells them apart: {a: 1} -> {a: true}
    # found no difference and fell back to the two opaque config hashes.
    kwargs = lambda value: {"model": {"chat_template_kwargs": {"a": value}}}  # noqa: E731
    assert describe_differences(kwargs(1), kwargs(True)) == \
        "model.chat_template_kwargs.a 1 -> true"
    assert describe_differences(kwargs(1), kwargs(1.0)) == \
        "model.chat_template_kwargs.a 1 -> 1.0"
    assert describe_differences(kwargs([0]), kwargs([False])) == \
        "model.chat_template_kwargs.a [0] -> [false]"
    assert describe_differences(kwargs(1.0), kwargs(1.0)) == ""
    assert describe_differences({"sampling": {"stop": ["a"]}}, {"sampling": {"stop": ["a"]}}) == ""
