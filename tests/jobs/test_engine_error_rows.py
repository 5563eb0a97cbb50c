"""A row the engine refused (runtime/request_checks.py: e.g. allowed ids that min_tokens bans
all of) was written with output_text "" and output_token_ids [], where a row refused before
the engine has nulls (rows.fill_error): two spellings of "no output" in one column. Both are
null since output rules v4."""

from llmbatch.jobs.rows import fill_error, fill_from_result
from llmbatch.runtime.outputs import GenerationResult


def _refused() -> GenerationResult:
    return GenerationResult(request_id=0, output_token_ids=[], output_text="",
                            finish_reason="error", num_prompt_tokens=4,
                            num_cached_prompt_tokens=0, num_output_tokens=0, ttft_s=None,
                            tpot_s=None, latency_s=None, spec_accepted_tokens=0,
                            error="allowed_token_ids are all stop ids")


def test_an_engine_error_row_has_null_output_like_any_error_row():
    row = fill_from_result({"id": 0}, _refused(), extra_output=("logprobs",))
    before = fill_error({"id": 0}, "prompt is empty", [1, 2, 3, 4])
    for key in ("output_text", "output_token_ids", "logprobs"):
        assert row.get(key) is None and before.get(key) is None, key
    assert (row["finish_reason"], row["error"]) == ("error", "allowed_token_ids are all stop ids")
    assert row["num_prompt_tokens"] == 4 and row["num_output_tokens"] == 0


def test_a_finished_row_keeps_its_output():
    done = _refused()
    done.finish_reason, done.error = "length", None
    done.output_token_ids, done.output_text, done.num_output_tokens = [7, 8], "ab", 2
    row = fill_from_result({"id": 0}, done)
    assert (row["output_text"], row["output_token_ids"]) == ("ab", [7, 8])
