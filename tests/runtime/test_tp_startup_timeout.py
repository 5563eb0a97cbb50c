"""Start-up vs step timeout of a tensor-parallel group (CPU, gloo, 3 ranks).

Every rank's start-up (rendezvous, group creation, the runner's agreement collectives) waits
max(step timeout, STARTUP_JOIN_MIN_S): a worker still importing torch on a busy machine must
not make an early peer time out. Once the runners are built the short step timeout is back:
a hung worker mid-job is reported within it."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from llmbatch.runtime import tp_executor
from llmbatch.runtime.config import EngineConfig
from llmbatch.runtime.dist import STARTUP_JOIN_MIN_S
from llmbatch.runtime.engine import Engine
from llmbatch.runtime.request import Request
from llmbatch.runtime.sampling_params import SamplingParams
from llmbatch.runtime.tp_worker import worker_main
from tests.runtime.tiny_models import make_model, make_prompts

STEP_TIMEOUT_S = 3.0
# Rank 2 starts this much later than rank 1: past the step timeout, well under the start-up
# minimum. Before the fix rank 1 gave up in init_group after STEP_TIMEOUT_S.
LATE_S = 2 * STEP_TIMEOUT_S
LATE_RANK = 2


def late_worker_main(rank: int, *args) -> None:
    """tp_worker.worker_main, with LATE_RANK sleeping first as if torch imported slowly."""
    if rank == LATE_RANK:
        time.sleep(LATE_S)
    worker_main(rank, *args)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    # 6 query / 3 KV heads, hidden 96: every weight splits three ways.
    path = tmp_path_factory.mktemp("tp3")
    make_model(path, num_heads=6, num_kv_heads=3, head_dim=16, hidden=96)
    return path


def engine_config(path, tp):
    return EngineConfig(model=str(path), device="cpu", dtype="float32", tensor_parallel_size=tp)


def generate(engine, prompts, max_new):
    reqs = [Request(i, p, SamplingParams(max_new_tokens=max_new, ignore_eos=True))
            for i, p in enumerate(prompts)]
    results = {r.request_id: r for r in engine.generate(reqs)}
    return [results[i].output_token_ids for i in range(len(prompts))]


def test_a_worker_later_than_the_step_timeout_joins_and_the_step_timeout_holds_after(
        model_path, tokenizer, monkeypatch):
    assert STEP_TIMEOUT_S < LATE_S < STARTUP_JOIN_MIN_S
    prompts = make_prompts(4, seed=5)
    want = generate(Engine(engine_config(model_path, 1), tokenizer=tokenizer), prompts, 4)
    monkeypatch.setattr(tp_executor, "worker_main", late_worker_main)
    start = time.monotonic()
    executor = tp_executor.TPExecutor(engine_config(model_path, 3), timeout_s=STEP_TIMEOUT_S)
    try:
        assert time.monotonic() - start >= LATE_S
        engine = Engine(engine_config(model_path, 3), runner=executor, tokenizer=tokenizer)
        assert generate(engine, prompts, 4) == want
        # Mid-job, a hung worker fails the next step within the step timeout, not the
        # start-up one.
        victim = executor.procs[LATE_RANK - 1]
        os.kill(victim.pid, signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(tp_executor.TensorParallelError) as info:
            generate(engine, prompts, 4)
        elapsed = time.monotonic() - start
    finally:
        executor.shutdown()
    assert str(info.value).startswith("tensor-parallel job failed in a step: ")
    assert str(info.value).endswith(" (collective timeout 3s)"), str(info.value)
    assert STEP_TIMEOUT_S <= elapsed < STEP_TIMEOUT_S + 5
    assert not victim.is_alive() and not torch.distributed.is_initialized()
