"""Process groups for tensor parallelism: who am I, where is the rendezvous, how do we stop.

Two ways a TP job gets its ranks:

    launched   torchrun / srun started one process per rank (RANK, WORLD_SIZE, LOCAL_RANK,
               MASTER_ADDR, MASTER_PORT, or SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID). Every
               process joins that group; this is how a model spans nodes.
    spawned    a plain `llmbatch run` with tensor_parallel_size N: this process is rank 0 and
               starts N-1 local workers (spawn context, so CUDA is never forked).

The rendezvous port derives from the job (SLURM_JOB_ID) or is a free port picked at start, so
two jobs on one node never collide. Every group has a timeout: a collective that waits on a
dead rank raises within it instead of hanging (gloo also fails at once when a peer's socket
closes). Two timeouts, one group: start-up (the rendezvous, the group's creation, the
runners' agreement collectives) runs under startup_timeout_s, then every rank switches the
group to the step timeout (set_step_timeout), so a rank hung mid-job is reported within it.

Spawned ranks meet in a TCPStore that rank 0 opens before it starts a worker (host_store). Each
worker connects and sets its `llmbatch/joined/<rank>` key (join_store) before it joins the
group; rank 0 waits for those keys while watching the worker processes (wait_for_workers), so
a worker that dies on the way (an import error, a script without a main guard that the spawn
start method runs again) fails the job at once, not after the group timeout: inside
init_process_group nothing can tell a dead rank from a slow one.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = float(os.environ.get("LLMBATCH_TP_TIMEOUT_S", "300"))
# Spawned workers import torch and the model code before they join (seconds; more on a busy
# machine): a short collective timeout (LLMBATCH_TP_TIMEOUT_S, or a test's 4 s) must not fail
# a start-up that is only slow. A worker that dies before joining is still reported at once
# (wait_for_workers polls describe_dead). Every rank waits this long, not only rank 0: an early
# worker waits for a late one inside the group's rendezvous (startup_timeout_s).
STARTUP_JOIN_MIN_S = 120.0
# Ports derived from a SLURM job id fall in [base, base + span): clear of the ephemeral range.
_SLURM_PORT_BASE, _SLURM_PORT_SPAN = 20000, 10000


@dataclass
class Rendezvous:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launched: bool          # True: torchrun/srun started every rank; False: we spawn them
    torchrun: bool = False  # torchrun's agent already hosts the store: join it via env://

    @property
    def init_method(self) -> str:
        if self.torchrun:
            return "env://"
        return f"tcp://{self.master_addr}:{self.master_port}"


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_port(job_id: str) -> int:
    """A port unique to a SLURM job on its nodes (steps of one job share it on purpose)."""
    digits = "".join(ch for ch in job_id if ch.isdigit())
    if not digits:
        raise ValueError(f"SLURM_JOB_ID={job_id!r} has no digits to derive a port from")
    return _SLURM_PORT_BASE + int(digits) % _SLURM_PORT_SPAN


def _slurm_master_addr(env) -> str:
    """First host of the allocation (scontrol expands ranges); localhost for one node."""
    nodes = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
    if nodes and not any(ch in nodes for ch in "[,"):
        return nodes
    if nodes:
        import subprocess

        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True,
                                 text=True, timeout=30, check=True).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return "127.0.0.1"


def detect_rendezvous(tp_size: int, env: Optional[dict] = None) -> Rendezvous:
    """Where this process stands in a TP job of `tp_size` ranks (see module doc).

    A launcher's world size must equal tensor_parallel_size (no data parallel across it)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun (or anything speaking its protocol)
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in env]
        if missing:
            raise ValueError(f"RANK/WORLD_SIZE are set but {', '.join(missing)} is not")
        rdv = Rendezvous(int(env["RANK"]), int(env["WORLD_SIZE"]),
                         int(env.get("LOCAL_RANK", env["RANK"])), env["MASTER_ADDR"],
                         int(env["MASTER_PORT"]), launched=True, torchrun=True)
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        port = int(env["MASTER_PORT"]) if "MASTER_PORT" in env else slurm_port(
            env.get("SLURM_JOB_ID", ""))
        rdv = Rendezvous(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                         int(env.get("SLURM_LOCALID", "0")),
                         env.get("MASTER_ADDR") or _slurm_master_addr(env), port, launched=True)
    else:
        # Spawned locally: a SLURM job (one task, N GPUs) still gets its job-derived port.
        port = slurm_port(env["SLURM_JOB_ID"]) if env.get("SLURM_JOB_ID") else free_port()
        return Rendezvous(0, tp_size, 0, "127.0.0.1", port, launched=False)
    if rdv.world_size != tp_size:
        raise ValueError(f"the launcher started {rdv.world_size} processes but "
                         f"tensor_parallel_size is {tp_size}; they must be equal")
    return rdv


def startup_timeout_s(step_timeout_s: float) -> float:
    """How long any rank waits for the others while the group starts (see module doc)."""
    return max(float(step_timeout_s), STARTUP_JOIN_MIN_S)


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def _joined_key(rank: int) -> str:
    return f"llmbatch/joined/{rank}"  # the group's own keys live under "default_pg/"


def host_store(rdv: Rendezvous, timeout_s: float) -> "dist.TCPStore":
    """Rank 0 of spawned ranks: listen on the rendezvous port before any worker starts.

    A port taken since it was picked (or a SLURM-derived port another process holds) raises
    DistNetworkError (EADDRINUSE) here, before anything is spawned. Not multi-tenant: a store
    left over in this process must not answer for a new job with its stale keys."""
    return dist.TCPStore(rdv.master_addr, rdv.master_port, rdv.world_size, is_master=True,
                         timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)


def join_store(rdv: Rendezvous, timeout_s: float) -> "dist.TCPStore":
    """A spawned worker: connect to rank 0's store and tell rank 0 this rank got this far."""
    store = dist.TCPStore(rdv.master_addr, rdv.master_port, rdv.world_size, is_master=False,
                          timeout=datetime.timedelta(seconds=timeout_s))
    store.set(_joined_key(rdv.rank), "1")
    return store


def wait_for_workers(store, procs: list, timeout_s: float, poll_s: float = 0.25) -> None:
    """Return once the spawned workers `procs` (ranks 1..) have all set their joined key in
    `store`. Raise RuntimeError naming the first worker that exited first (describe_dead), or
    TimeoutError naming the ranks still missing after timeout_s."""
    keys = [_joined_key(rank) for rank in range(1, len(procs) + 1)]
    deadline = time.monotonic() + timeout_s
    while not store.check(keys):
        dead = describe_dead(procs)
        if dead:
            raise RuntimeError(dead)
        if time.monotonic() >= deadline:
            missing = [str(rank) for rank, key in enumerate(keys, start=1)
                       if not store.check([key])]
            raise TimeoutError(f"tensor-parallel rank{'s' if len(missing) > 1 else ''} "
                               f"{', '.join(missing)} did not join the group within "
                               f"{timeout_s:g}s")
        time.sleep(poll_s)


def init_group(rdv: Rendezvous, device: torch.device, timeout_s: float,
               store: Optional["dist.Store"] = None) -> "dist.ProcessGroup":
    """Join the default group (device backend) and return a gloo group for host-side control
    messages (step inputs travel as pickled Python objects over it). Spawned ranks pass the
    store they met in (host_store / join_store); launched ranks rendezvous by rdv.init_method.

    Both groups start under startup_timeout_s(timeout_s); the caller switches them to the step
    timeout `timeout_s` with set_step_timeout once every rank has built its runner."""
    if dist.is_initialized():
        raise RuntimeError("a torch.distributed process group already exists in this process; "
                           "one tensor-parallel engine per process")
    # The group's timeout (not the store's) bounds the rendezvous: gloo waits in the store for
    # every peer's address, so an early rank waits here for one still importing torch. gloo
    # also applies it to every later collective. Hence start long and shorten once started
    # (set_step_timeout): one group, no second rendezvous, and no start-up collective fails
    # on a rank that is only slow.
    timeout = datetime.timedelta(seconds=startup_timeout_s(timeout_s))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    where = dict(store=store) if store is not None else dict(init_method=rdv.init_method)
    dist.init_process_group(backend_for(device), rank=rdv.rank, world_size=rdv.world_size,
                            timeout=timeout, **where)
    if backend_for(device) == "gloo":
        return dist.group.WORLD
    return dist.new_group(backend="gloo", timeout=timeout)


def set_step_timeout(group: "dist.ProcessGroup", timeout_s: float) -> None:
    """Give the default group and the control `group` the step timeout (end of start-up).

    Each rank sets its own side; a rank whose peer hangs mid-step raises after timeout_s.
    torch has no public setter: _set_pg_timeout (torch >= 2.2) sets the default timeout that
    gloo and NCCL apply to every collective issued after it."""
    from torch.distributed.distributed_c10d import _set_pg_timeout

    timeout = datetime.timedelta(seconds=float(timeout_s))
    _set_pg_timeout(timeout)  # the default group: the layers' all-reduces and all-gathers
    if group is not dist.group.WORLD:
        _set_pg_timeout(timeout, group)


def min_over_ranks(value: int, group=None) -> int:
    """The smallest `value` of all ranks (e.g. KV blocks that fit every rank's memory)."""
    t = torch.tensor([int(value)], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return int(t.item())


def gather_ints(value: int, group=None) -> list[int]:
    """`value` of every rank, in rank order (e.g. weight bytes per rank)."""
    parts = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, torch.tensor([int(value)], dtype=torch.long), group=group)
    return [int(p.item()) for p in parts]


def exit_process(code: int) -> None:
    """End a worker process now. os._exit skips interpreter teardown, where the
    communication library's background threads can abort the process (SIGABRT) after the
    group was already destroyed cleanly."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def destroy_group() -> None:
    """Leave the default group (idempotent; never raises during cleanup)."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a group broken by a dead rank may fail to tear down cleanly
            pass
    import gc

    gc.collect()  # release the group's C++ objects now, not at interpreter teardown


def spawn_workers(world_size: int, target, args: tuple) -> list:
    """Start ranks 1..world_size-1 as daemon processes running target(rank, *args).

    Daemons die with this process, so a crashed rank 0 never leaves workers behind."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = []
    for rank in range(1, world_size):
        p = ctx.Process(target=target, args=(rank,) + tuple(args), daemon=True,
                        name=f"llmbatch-tp-rank{rank}")
        p.start()
        procs.append(p)
    return procs


def describe_dead(procs: list) -> Optional[str]:
    """One line naming the first local worker that has exited, or None if all are alive."""
    for rank, p in enumerate(procs, start=1):
        if p.exitcode is not None:
            how = (f"killed by signal {-p.exitcode}" if p.exitcode < 0
                   else f"exited with code {p.exitcode}")
            return f"tensor-parallel rank {rank} (pid {p.pid}) {how}"
    return None


def join_workers(procs: list, timeout_s: float = 30.0) -> None:
    """Wait for workers to exit; kill the ones that do not within the timeout (SIGKILL: a
    stopped or wedged process ignores SIGTERM)."""
    for p in procs:
        p.join(timeout_s)
        if p.is_alive():
            p.kill()
            p.join(5)


def cpu_threads_per_rank(world_size: int) -> int:
    """CPU ranks share the host's cores: more threads than cores only thrash."""
    return max(1, (os.cpu_count() or 1) // world_size)
