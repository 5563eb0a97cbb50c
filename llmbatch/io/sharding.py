"""Shard k of n: a contiguous, deterministic range of input rows (no torch).

Shards are contiguous so each shard's output, read in (shard, seq) order, is a slice of the
input in order, and concatenating all shards gives the whole input in order.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping, Optional, Union

from llmbatch.jobs.errors import InvalidJobError


# SLURM's largest MaxArraySize. Far larger counts overflowed the stats writer's int64 after
# a part was committed (exit 1), and merge's set of shard indices took all memory.
MAX_SHARDS = 4_000_001


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    def row_range(self, num_rows: int) -> tuple[int, int]:
        """[start, end) of this shard over `num_rows` rows; sizes differ by at most one row,
        the first `num_rows % count` shards taking the extra row."""
        base, extra = divmod(num_rows, self.count)
        start = self.index * base + min(self.index, extra)
        end = start + base + (1 if self.index < extra else 0)
        return start, end


def _int_env(env: Mapping[str, str], name: str) -> Optional[int]:
    raw = env.get(name)
    if raw is None or raw == "":
        return None
    # ASCII digits only: int() also takes "1_000" and full-width digits, which SLURM never
    # writes (a hand-set variable with them is a mistake to name, not a shard to guess).
    if not re.fullmatch(r"-?[0-9]+", raw):
        raise InvalidJobError(f"shard: environment variable {name}={raw!r} is not an integer")
    return int(raw)


def resolve_shard(index: Union[str, int], count: Union[str, int],
                  env: Optional[Mapping[str, str]] = None) -> Shard:
    """Resolve `shard.index`/`shard.count` ("auto" or int).

    auto: index = (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP (MIN
    defaults to 0, so arrays numbered 1..N work; STEP to 1), count = SLURM_ARRAY_TASK_COUNT;
    without SLURM array variables: 0 of 1. A task id without a task count is refused when
    shard.count is auto (SLURM sets both; running every task as shard 0 of 1 would run the
    whole input in each); with shard.count set, the task id still gives the index.
    """
    env = os.environ if env is None else env
    if count != "auto" and index != "auto":
        # Both explicit: SLURM's variables pick nothing, so a malformed one is not judged.
        return _checked(index, count)
    task_id = _int_env(env, "SLURM_ARRAY_TASK_ID")
    if count == "auto":
        task_count = _int_env(env, "SLURM_ARRAY_TASK_COUNT")
        if task_id is not None and task_count is None:
            raise InvalidJobError(
                f"shard: SLURM_ARRAY_TASK_ID={task_id} is set but SLURM_ARRAY_TASK_COUNT is "
                f"not; set shard.count (and shard.index) explicitly")
        count = task_count if task_id is not None else 1
    if index == "auto":
        index = _index_from_task_id(task_id, env) if task_id is not None else 0
    return _checked(index, count)


def _index_from_task_id(task_id: int, env: Mapping[str, str]) -> int:
    task_min = _int_env(env, "SLURM_ARRAY_TASK_MIN") or 0
    # A stepped array (--array=0-10:2) numbers its tasks MIN, MIN+STEP, ...
    task_step = _int_env(env, "SLURM_ARRAY_TASK_STEP")
    task_step = 1 if task_step is None else task_step
    if task_step < 1:
        raise InvalidJobError(f"shard: environment variable SLURM_ARRAY_TASK_STEP="
                              f"{task_step} is not a positive step")
    if (task_id - task_min) % task_step:
        raise InvalidJobError(
            f"SLURM_ARRAY_TASK_ID={task_id} is not MIN + k*STEP ({task_min}, "
            f"{task_step}); set shard.index and shard.count explicitly")
    return (task_id - task_min) // task_step


def _checked(index: int, count: int) -> Shard:
    if not 1 <= count <= MAX_SHARDS:
        raise InvalidJobError(f"shard.count must be in [1, {MAX_SHARDS}], got {count}")
    if not 0 <= index < count:
        raise InvalidJobError(f"shard.index must be in [0, {count - 1}] for shard.count={count}, "
                              f"got {index}")
    return Shard(int(index), int(count))
