"""Shard k of n: contiguous, covering, deterministic; SLURM array variables."""

import re

import pytest

from llmbatch.io.sharding import Shard, resolve_shard
from llmbatch.jobs.errors import InvalidJobError


def test_shards_are_contiguous_and_cover_every_row_once():
    for num_rows in (0, 1, 7, 10, 2000):
        for count in (1, 2, 3, 7):
            ranges = [Shard(k, count).row_range(num_rows) for k in range(count)]
            assert ranges[0][0] == 0 and ranges[-1][1] == num_rows
            for (a0, a1), (b0, b1) in zip(ranges, ranges[1:]):
                assert a1 == b0
            sizes = [b - a for a, b in ranges]
            assert max(sizes) - min(sizes) <= 1


def test_exact_ranges():
    assert [Shard(k, 3).row_range(10) for k in range(3)] == [(0, 4), (4, 7), (7, 10)]


def test_auto_without_slurm_is_zero_of_one():
    assert resolve_shard("auto", "auto", env={}) == Shard(0, 1)


def test_auto_from_slurm_array():
    env = {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert resolve_shard("auto", "auto", env=env) == Shard(2, 4)
    # Arrays numbered 1..4 (sbatch --array=1-4): SLURM_ARRAY_TASK_MIN shifts the index.
    env = {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1"}
    assert resolve_shard("auto", "auto", env=env) == Shard(3, 4)
    # Explicit values win over the environment.
    assert resolve_shard(1, 2, env=env) == Shard(1, 2)


def test_invalid_shards():
    with pytest.raises(InvalidJobError, match=r"shard.index must be in \[0, 1\]"):
        resolve_shard(2, 2, env={})
    with pytest.raises(InvalidJobError, match="shard.count must be in \\[1, 4000001\\]"):
        resolve_shard(0, 0, env={})
    with pytest.raises(InvalidJobError, match="SLURM_ARRAY_TASK_ID='x' is not an integer"):
        resolve_shard("auto", "auto", env={"SLURM_ARRAY_TASK_ID": "x",
                                           "SLURM_ARRAY_TASK_COUNT": "2"})


def test_a_task_id_without_a_task_count():
    """Every task of such an array ran as shard 0 of 1: the whole input in each (the second
    met the first's lock, or ran it again after). Refused while shard.count is auto; with
    shard.count set, the task id still gives the index."""
    env = {"SLURM_ARRAY_TASK_ID": "3"}
    with pytest.raises(InvalidJobError, match=r"^shard: SLURM_ARRAY_TASK_ID=3 is set but "
                                              r"SLURM_ARRAY_TASK_COUNT is not; set shard.count"):
        resolve_shard("auto", "auto", env=env)
    assert resolve_shard("auto", 4, env=env) == Shard(3, 4)
    assert resolve_shard("auto", 8, env=dict(env, SLURM_ARRAY_TASK_MIN="1")) == Shard(2, 8)
    with pytest.raises(InvalidJobError, match=r"shard.index must be in \[0, 1\]"):
        resolve_shard("auto", 2, env=env)
    assert resolve_shard(0, 1, env=env) == Shard(0, 1)     # explicit values win


@pytest.mark.parametrize("name,raw", [("SLURM_ARRAY_TASK_ID", "1_0"),
                                      ("SLURM_ARRAY_TASK_COUNT", "\uff14"),   # full-width 4
                                      ("SLURM_ARRAY_TASK_MIN", " 1"),
                                      ("SLURM_ARRAY_TASK_STEP", "+2")])
def test_slurm_numbers_are_plain_ascii_integers(name, raw):
    env = dict({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}, **{name: raw})
    with pytest.raises(InvalidJobError, match=re.escape(f"{name}={raw!r} is not an integer")):
        resolve_shard("auto", "auto", env=env)


@pytest.mark.parametrize("step", ["0", "-2"])
def test_a_step_below_one_is_refused(step):
    env = {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4",
           "SLURM_ARRAY_TASK_STEP": step}
    with pytest.raises(InvalidJobError, match=f"SLURM_ARRAY_TASK_STEP={int(step)} is not a "
                                              f"positive step"):
        resolve_shard("auto", "auto", env=env)


def test_review_of_the_slurm_checks():
    """'--1' passed the digit check and then int() raised (exit 1); a bad STEP was refused
    even when shard.index and shard.count were set and the variables unused."""
    env = {"SLURM_ARRAY_TASK_ID": "--1", "SLURM_ARRAY_TASK_COUNT": "4"}
    with pytest.raises(InvalidJobError, match=re.escape("SLURM_ARRAY_TASK_ID='--1' is not an "
                                                        "integer")):
        resolve_shard("auto", "auto", env=env)
    env = {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4",
           "SLURM_ARRAY_TASK_STEP": "0"}
    assert resolve_shard(1, 3, env=env) == Shard(1, 3)


@pytest.mark.parametrize("name", ["SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT",
                                  "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP"])
def test_variables_that_pick_nothing_are_not_judged(name):
    """With shard.index and shard.count explicit no SLURM variable is read, so a malformed
    one (here 'x') no longer stops the run; one that does pick a value is still checked."""
    env = dict({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}, **{name: "x"})
    assert resolve_shard(1, 3, env=env) == Shard(1, 3)
    if name in ("SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP"):
        # index explicit, count auto: only ID and COUNT are read
        assert resolve_shard(1, "auto", env=env) == Shard(1, 4)
    if name == "SLURM_ARRAY_TASK_COUNT":
        # count explicit, index auto: COUNT is not read
        assert resolve_shard("auto", 4, env=env) == Shard(2, 4)
    else:
        with pytest.raises(InvalidJobError, match=re.escape(f"{name}='x' is not an integer")):
            resolve_shard("auto", 4, env=env)
