"""A refused value is quoted once: a README check found sampling.structured_outputs
{choise: [a]} refused as "... got {'choise': ['a']} (got {'choise': ['a']})"."""

import pytest

from llmbatch.jobs.errors import InvalidJobError
from llmbatch.jobs.loader import load_job


def test_a_message_that_quotes_the_value_does_not_repeat_it(tmp_path):
    job = {"model": {"path": "m"}, "input": {"path": "in.parquet"},
           "output": {"path": str(tmp_path / "out")},
           "sampling": {"structured_outputs": {"choise": ["a"]}}}
    with pytest.raises(InvalidJobError) as info:
        load_job(job)
    message = str(info.value)
    assert message.count("{'choise': ['a']}") == 1, message
    assert message.startswith("sampling.structured_outputs: structured_outputs must be a "
                              "mapping with exactly one of"), message
