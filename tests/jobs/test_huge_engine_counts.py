"""Engine counts far past any real use are refused before anything is written (exit 2).
planner_window >= 2**63 reached islice() as an engine failure (exit 1) after output.mode:
overwrite had already deleted the old output; a kv_cache_blocks larger than the device's
memory was an overflow TypeError or an allocation error with C++ frames (exit 1)."""

import pytest

from llmbatch import run_job
from llmbatch.jobs.errors import InvalidJobError


@pytest.fixture
def job(tmp_path, tiny_llama_dir, jobkit, monkeypatch):
    monkeypatch.delenv("LLMBATCH_ENGINE_FACTORY", raising=False)
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 3)
    return lambda **engine: jobkit.make_job(tiny_llama_dir, inp, str(tmp_path / "out"),
                                            engine={"device": "cpu", **engine})


def test_a_huge_planner_window_keeps_the_old_output(job, tmp_path):
    run_job(job())
    before = sorted(p.name for p in (tmp_path / "out").rglob("*"))
    bad = job(planner_window=2**64)
    bad["output"]["mode"] = "overwrite"
    with pytest.raises(InvalidJobError) as info:
        run_job(bad)
    assert (info.value.exit_code, info.value.message) == (
        2, f"invalid engine/sampling settings: planner_window must be <= 2147483647, "
           f"got {2**64}")
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == before


@pytest.mark.parametrize("blocks", [10**11, 10**20])
def test_a_kv_pool_larger_than_memory_is_refused(job, tmp_path, blocks):
    with pytest.raises(InvalidJobError) as info:
        run_job(job(kv_cache_blocks=blocks))
    message = info.value.message
    assert info.value.exit_code == 2
    assert message.startswith(f"invalid engine settings: kv_cache_blocks={blocks} needs "), message
    assert message.endswith(" GiB of memory; lower it or set it to null (sized from the "
                            "memory budget)"), message
    assert not (tmp_path / "out").exists()
