"""A tensor-parallel rank other than 0: load this rank's shard, then run every step's forward.

Protocol over the gloo control group (rank 0 is the root of every broadcast):

    construction   every rank builds ModelRunner(tp_rank, tp_size) in the same order of
                   collectives: (CUDA warm-up forward), KV blocks = min over ranks, then the
                   weight bytes of every rank are all-gathered, then the quantized GEMM
                   paths agreed (kernel_paths.agree_across_ranks: int8, nf4 layer counts).
                   All of it under the start-up timeout; then each rank switches the group
                   to the step timeout (dist.set_step_timeout).
    each step      rank 0 broadcasts the step's StepInputs (pickled, `sample_requests`
                   emptied: Request objects stay on rank 0), then every rank runs
                   ModelRunner.forward_logits on it: all-reduces in the row-parallel layers and
                   the embedding, all-gather in the LM head. Only rank 0 samples.
    shutdown       rank 0 broadcasts None; a barrier, then every rank leaves the group.

A worker that fails prints one line to stderr and exits non-zero; rank 0 notices in its next
collective (socket closed, or the group timeout) and fails the job; before the group exists,
while it waits for the workers in the rendezvous store (dist.wait_for_workers).
"""

from __future__ import annotations

import dataclasses
import logging
import sys

import torch
import torch.distributed as dist

from llmbatch.one_line import one_line
from llmbatch.runtime.config import EngineConfig
from llmbatch.runtime.dist import (Rendezvous, cpu_threads_per_rank, destroy_group, exit_process,
                                   gather_ints, init_group, join_store, set_step_timeout,
                                   startup_timeout_s)

logger = logging.getLogger(__name__)


def rank_config(config: EngineConfig, local_rank: int) -> EngineConfig:
    """The config a rank builds its runner with: CUDA ranks get their own local GPU."""
    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if device != "cuda":
            raise ValueError(f"device={config.device!r} names one GPU but tensor_parallel_size="
                             f"{config.tensor_parallel_size}; use device auto or cuda")
        visible = torch.cuda.device_count()
        if visible == 1:  # e.g. srun --gpus-per-task=1: each rank sees only its own GPU
            device = "cuda:0"
        elif local_rank < visible:
            device = f"cuda:{local_rank}"
        else:
            raise ValueError(f"tensor-parallel local rank {local_rank} has no GPU: "
                             f"{visible} visible on this node")
    return dataclasses.replace(config, device=device)


def build_runner(config: EngineConfig, rdv: Rendezvous, group, timeout_s: float):
    """This rank's ModelRunner; a collective sequence every rank runs identically. Runs under
    the start-up timeout (ranks load their shards at different speeds) and leaves `group`
    with the step timeout `timeout_s`."""
    from llmbatch.runtime.kernel_paths import agree_across_ranks
    from llmbatch.runtime.model_runner import ModelRunner

    runner = ModelRunner(config, tp_rank=rdv.rank, tp_size=rdv.world_size, tp_group=group)
    runner.weight_bytes_per_rank = gather_ints(runner.weight_bytes, group)
    agree_across_ranks(runner, lambda v: gather_ints(v, group))  # same GEMM path everywhere
    set_step_timeout(group, timeout_s)  # started: from here a silent rank is a hung one
    return runner


def step_message(s):
    """What the other ranks need of a StepInputs: everything but the Request objects."""
    return dataclasses.replace(s, sample_requests=[], score_requests=[])


def serve(runner, group) -> None:
    """Run the forward of every step rank 0 broadcasts, until it broadcasts None."""
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=group)
        if box[0] is None:
            dist.barrier(group=group)  # nobody tears down while another rank still talks
            return
        runner.forward_logits(box[0])


def worker_main(rank: int, rdv: Rendezvous, config: EngineConfig, timeout_s: float) -> None:
    """Entry point of a spawned worker process (rank >= 1 on this node)."""
    rdv = dataclasses.replace(rdv, rank=rank, local_rank=rank)
    code = 0
    try:
        cfg = rank_config(config, rdv.local_rank)
        if cfg.device == "cpu":
            torch.set_num_threads(cpu_threads_per_rank(rdv.world_size))
        store = join_store(rdv, startup_timeout_s(timeout_s))
        group = init_group(rdv, torch.device(cfg.device), timeout_s, store)
        serve(build_runner(cfg, rdv, group, timeout_s), group)
    except KeyboardInterrupt:
        code = 130
    except BaseException as e:  # one line; rank 0 reports the job failure
        print(f"llmbatch tensor-parallel rank {rank}: "
              f"{one_line(e, first_line=True, with_type=True)}",
              file=sys.stderr, flush=True)
        code = 1
    finally:
        destroy_group()
    exit_process(code)
