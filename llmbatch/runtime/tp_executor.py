"""make_model_runner: a ModelRunner at tensor_parallel_size 1, a TPExecutor above it.

TPExecutor has the ModelRunner interface the Engine uses (model_path, hf_config, max_model_len,
num_kv_blocks, weight_bytes, execute). It is rank 0: it holds rank 0's shard in a ModelRunner,
builds each step's inputs from the SchedulerOutput, broadcasts them to the other ranks
(tp_worker.serve), runs its own share of the forward and samples.

Launched by torchrun/srun, every process calls make_model_runner; ranks > 0 never return from
it: they serve steps until rank 0 shuts down, then end the process (os._exit), so the job
layer around the Engine only ever runs on rank 0.

Failure: any error in a step's collectives (a rank died: its socket closed, or the step
timeout passed; start-up waits at least dist.STARTUP_JOIN_MIN_S, see dist.init_group)
becomes one RuntimeError naming the dead rank when it is a local worker; the
group is torn down and the surviving workers are stopped, so nothing hangs. A spawned worker
that exits before it joins the group fails the start the same way, within a second
(dist.wait_for_workers), not after the group timeout.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import sys
import time
import traceback
from typing import Any, Optional

import torch
import torch.distributed as dist

from llmbatch.runtime.config import EngineConfig
from llmbatch.runtime.dist import (DEFAULT_TIMEOUT_S, Rendezvous, cpu_threads_per_rank,
                                   describe_dead, destroy_group, detect_rendezvous,
                                   exit_process, host_store, init_group, join_workers,
                                   spawn_workers, startup_timeout_s, wait_for_workers)
from llmbatch.runtime.kernel_paths import PATH_STATS
from llmbatch.one_line import one_line
from llmbatch.runtime.scheduler_output import SchedulerOutput
from llmbatch.runtime.tp_worker import (build_runner, rank_config, serve, step_message,
                                        worker_main)

logger = logging.getLogger(__name__)


class TensorParallelError(RuntimeError):
    """The tensor-parallel group failed (a rank died or did not start, a collective timed
    out): the job layer reports it as one line (jobs/engine_factory.py), not as a bug."""


def make_model_runner(config: EngineConfig):
    """The Engine's runner for `config` (see module doc for launched ranks > 0)."""
    if config.tensor_parallel_size == 1:
        from llmbatch.runtime.model_runner import ModelRunner

        return ModelRunner(config)
    rdv = detect_rendezvous(config.tensor_parallel_size)
    if rdv.launched and rdv.rank > 0:
        try:
            run_launched_worker(config, rdv, DEFAULT_TIMEOUT_S)
        except BaseException as e:  # one line, like a spawned worker
            print(f"llmbatch tensor-parallel rank {rdv.rank}: {one_line(e, first_line=True, with_type=True)}", file=sys.stderr)
            exit_process(1)
        exit_process(0)
    return TPExecutor(config, rdv=rdv)


def run_launched_worker(config: EngineConfig, rdv: Rendezvous, timeout_s: float) -> None:
    cfg = rank_config(config, rdv.local_rank)
    if cfg.device == "cpu":
        torch.set_num_threads(cpu_threads_per_rank(rdv.world_size))
    group = init_group(rdv, torch.device(cfg.device), timeout_s)
    try:
        serve(build_runner(cfg, rdv, group, timeout_s), group)
    finally:
        destroy_group()


def check_shardable(config: EngineConfig) -> None:
    """Raise the ValueError/ImportError every rank would hit (head counts that do not split,
    missing bitsandbytes) by building rank 0's model on the meta device: no memory, no I/O."""
    from llmbatch.runtime.layers.quantization import attach_quantization
    from llmbatch.runtime.loader import load_hf_config, resolve_model_path
    from llmbatch.runtime.models.registry import build_model

    hf_config = load_hf_config(resolve_model_path(config.model), config.trust_remote_code)
    model = build_model(hf_config, "float32", "meta", 0, config.tensor_parallel_size)
    attach_quantization(model, config.quantization, hf_config)


class TPExecutor:
    def __init__(self, config: EngineConfig, timeout_s: Optional[float] = None,
                 rdv: Optional[Rendezvous] = None) -> None:
        tp = config.tensor_parallel_size
        if tp < 2:
            raise ValueError(f"TPExecutor needs tensor_parallel_size >= 2, got {tp}")
        self.config = config
        self.timeout_s = DEFAULT_TIMEOUT_S if timeout_s is None else float(timeout_s)
        self.rdv = rdv or detect_rendezvous(tp)
        if self.rdv.rank != 0:
            raise ValueError(f"TPExecutor runs on rank 0, this process is rank {self.rdv.rank}")
        self._closed, self.procs, self._in_step = False, [], False
        cfg = rank_config(config, self.rdv.local_rank)
        if not self.rdv.launched:  # fail before spawning anything
            from llmbatch.runtime.loader import resolve_model_path

            # Resolved once here (a hub id is fetched once), the workers get the local path.
            config = dataclasses.replace(config, model=resolve_model_path(config.model))
            check_shardable(config)
            if cfg.device.startswith("cuda") and torch.cuda.device_count() < tp:
                raise ValueError(f"tensor_parallel_size={tp} needs {tp} GPUs on this node; "
                                 f"{torch.cuda.device_count()} visible")
        self._saved_threads = torch.get_num_threads()
        if cfg.device == "cpu":  # restored at shutdown
            torch.set_num_threads(cpu_threads_per_rank(tp))
        try:
            store = None
            if not self.rdv.launched:  # listening before a worker can try to connect
                store = host_store(self.rdv, startup_timeout_s(self.timeout_s))
                self.procs = spawn_workers(tp, worker_main, (self.rdv, config, self.timeout_s))
                wait_for_workers(store, self.procs, startup_timeout_s(self.timeout_s))
            self.group = init_group(self.rdv, torch.device(cfg.device), self.timeout_s, store)
            del store  # the group holds it now; shutdown's destroy_group releases the port
            self.runner = build_runner(cfg, self.rdv, self.group, self.timeout_s)
        except Exception as e:
            store = None  # its server holds the rendezvous port until the last reference goes
            self._fail(e, "starting")
        atexit.register(self.shutdown)
        r = self.runner
        # The ModelRunner surface the Engine reads.
        self.model_path, self.hf_config = r.model_path, r.hf_config
        self.max_model_len, self.num_kv_blocks = r.max_model_len, r.num_kv_blocks
        self.device, self.dtype, self.block_size = r.device, r.dtype, r.block_size
        self.weight_bytes = r.weight_bytes                  # rank 0's
        self.weight_bytes_per_rank = r.weight_bytes_per_rank
        self.quantization = r.quantization                  # a pre-quantized checkpoint's method
        self.model = r.model                                # rank 0's shard
        for key in PATH_STATS:  # kernel paths, the same on every rank (agree_across_ranks)
            setattr(self, key, getattr(r, key))
        self.rotary_in_attention_active = r.rotary_in_attention_active

    def prepare_inputs(self, out: SchedulerOutput):
        return self.runner.prepare_inputs(out)

    def execute(self, out: SchedulerOutput) -> dict[Any, list[int]]:
        if self._closed:
            raise RuntimeError("tensor-parallel executor is shut down")
        if not out.scheduled:
            return {}
        s = self.runner.prepare_inputs(out)
        # Set while the ranks may be inside this step's collectives: a KeyboardInterrupt or the
        # CLI's SIGTERM exception that unwinds from here leaves the workers mid-step, where
        # shutdown's broadcast and barrier would wait out the whole group timeout.
        self._in_step = True
        try:
            dead = describe_dead(self.procs)
            if dead:
                raise RuntimeError(dead)
            dist.broadcast_object_list([step_message(s)], src=0, group=self.group)
            logits = self.runner.forward_logits(s)
        except Exception as e:
            self._fail(e, "in a step")
        self._in_step = False
        if logits is None:
            return {}
        return self.runner.sample(s, logits)

    def _fail(self, e: BaseException, when: str) -> None:
        # The collective error is often generic (socket closed); a dead local worker is the
        # better explanation. Give its exit a moment to be reaped.
        deadline = time.monotonic() + 2.0
        if isinstance(e, (ValueError, ImportError, FileNotFoundError)):
            deadline = 0.0  # our own, explicit error: it says more than a worker's exit code
        dead = describe_dead(self.procs)
        while dead is None and self.procs and time.monotonic() < deadline:
            time.sleep(0.05)
            dead = describe_dead(self.procs)
        joined = getattr(self, "group", None) is not None   # (shutdown clears it)
        self.shutdown(broken=True)
        # The frames of the failed call (the rendezvous store among their locals) would live
        # as long as the caller keeps the error, which chains to `e`.
        traceback.clear_frames(e.__traceback__)
        own = one_line(e, first_line=True, with_type=True)
        reason = own if deadline == 0.0 else (dead or own)
        # Start-up ran under the longer start-up timeout (dist.init_group), steps under ours.
        timeout_s = startup_timeout_s(self.timeout_s) if when == "starting" else self.timeout_s
        suffix = f" (collective timeout {timeout_s:g}s)"
        if reason == dead and "killed by signal" in dead:
            suffix = ""   # killed from outside: no timeout was involved
        elif dead and not joined and not self.rdv.launched:
            # Spawned, died before joining: no timeout was involved. The commonest cause is a
            # script whose run_job call the spawn start method runs again in the worker.
            suffix = (" before joining the group (its own error is printed above; a script "
                      "running a tensor-parallel job needs its run_job call under "
                      "`if __name__ == \"__main__\":`, since each rank imports it again)")
        raise TensorParallelError(f"tensor-parallel job failed {when}: {reason}{suffix}") \
            from None

    def shutdown(self, broken: bool = False) -> None:
        """Stop the workers and leave the group. Idempotent; also runs at exit."""
        if self._closed:
            return
        self._closed = True
        broken = broken or self._in_step   # interrupted mid-step: the workers cannot answer
        if not broken and getattr(self, "group", None) is not None:
            try:
                dist.broadcast_object_list([None], src=0, group=self.group)
                dist.barrier(group=self.group)
            except Exception:
                broken = True
        if broken:
            for p in self.procs:  # survivors would only wait for the group timeout
                if p.is_alive():
                    p.kill()
        # No Python reference may outlive the group: a ProcessGroup object destroyed during
        # interpreter teardown can abort the process.
        self.group = None
        destroy_group()
        join_workers(self.procs, timeout_s=5.0 if broken else 30.0)
        torch.set_num_threads(self._saved_threads)

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:
            pass
