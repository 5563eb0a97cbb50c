"""Tensor parallelism on CPU with gloo: greedy output at tensor_parallel_size 2 and 4 equals
size 1 and transformers; each rank reads only its slice; a killed rank fails the job quickly;
rendezvous detection for torchrun / srun / local spawn."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from llmbatch.runtime.config import EngineConfig
from llmbatch.runtime.dist import detect_rendezvous, slurm_port
from llmbatch.runtime.engine import Engine
from llmbatch.runtime.layers import weight_utils
from llmbatch.runtime.layers.quantization import model_weight_bytes
from llmbatch.runtime.loader import load_weights
from llmbatch.runtime.models.registry import build_model
from llmbatch.runtime.request import Request
from llmbatch.runtime.sampling_params import SamplingParams
from llmbatch.runtime.tp_executor import TPExecutor
from tests.runtime.test_engine_greedy import hf_greedy
from tests.runtime.tiny_models import make_model, make_prompts

MAX_NEW = 8
NUM_PROMPTS = 32
TIMEOUT_S = 60  # collective timeout of the TP groups in these tests

MODELS = {
    # llama: 2 KV heads, so TP 4 replicates each KV head on 2 ranks.
    "llama-gqa": dict(arch="llama", num_heads=4, num_kv_heads=2, head_dim=16),
    "qwen2-gqa": dict(arch="qwen2", num_heads=4, num_kv_heads=2),
    "qwen3-tied": dict(arch="qwen3", tie=True, num_heads=4, num_kv_heads=4, head_dim=16),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (path, hf config, prompts, transformers greedy outputs)."""
    out = {}
    for name, kwargs in MODELS.items():
        path = tmp_path_factory.mktemp(name)
        hf = make_model(path, **kwargs)
        prompts = make_prompts(NUM_PROMPTS, seed=3)
        out[name] = (path, hf.config, prompts, hf_greedy(hf, prompts, MAX_NEW, eos=2))
    return out


def engine_config(path, tp, **kw):
    # Prefix caching is on (the default).
    return EngineConfig(model=str(path), device="cpu", dtype="float32", tensor_parallel_size=tp,
                        **kw)


def generate(engine, prompts, max_new=MAX_NEW):
    reqs = [Request(i, p, SamplingParams(max_new_tokens=max_new)) for i, p in enumerate(prompts)]
    results = {r.request_id: r for r in engine.generate(reqs)}
    return [results[i].output_token_ids for i in range(len(prompts))]


def rank_weight_bytes(hf_config, tp):
    """Bytes each rank should hold, from the model built on the meta device (no data)."""
    return [model_weight_bytes(build_model(hf_config, "float32", "meta", r, tp))
            for r in range(tp)]


@pytest.mark.parametrize("name, tp", [("llama-gqa", 2), ("llama-gqa", 4), ("qwen2-gqa", 4),
                                      ("qwen3-tied", 2)])
def test_greedy_tp_equals_tp1_and_transformers(models, tokenizer, name, tp):
    path, hf_config, prompts, expected = models[name]
    single = Engine(engine_config(path, 1), tokenizer=tokenizer)
    assert generate(single, prompts) == expected
    executor = TPExecutor(engine_config(path, tp), timeout_s=TIMEOUT_S)
    try:
        engine = Engine(engine_config(path, tp), runner=executor, tokenizer=tokenizer)
        assert engine.runner.num_kv_blocks == single.runner.num_kv_blocks
        assert generate(engine, prompts) == expected
        assert engine.stats()["num_cached_prompt_tokens"] > 0  # prefix cache was hit
        # The kernel paths rank 0 took (the same on every rank; none on CPU), not unknown.
        assert [engine.stats()[k] for k in ("fused_kernels_active", "int8_triton_layers",
                                            "nf4_triton_error")] == [False, 0, None]
        assert executor.weight_bytes_per_rank == rank_weight_bytes(hf_config, tp)
        assert executor.weight_bytes_per_rank[0] < single.runner.weight_bytes
    finally:
        executor.shutdown()
    assert [p.exitcode for p in executor.procs] == [0] * (tp - 1)


def kill_at_step(executor, step, sig):
    """Send `sig` to rank 1 just before the executor's `step`-th step (mid-job)."""
    execute, calls = executor.execute, []

    def wrapped(out):
        calls.append(time.monotonic())
        if len(calls) == step:
            os.kill(executor.procs[0].pid, sig)
        return execute(out)

    executor.execute = wrapped
    return calls


@pytest.mark.parametrize("sig, timeout_s", [(signal.SIGKILL, 20), (signal.SIGSTOP, 4)])
def test_dead_or_hung_rank_fails_the_job_within_the_timeout(models, tokenizer, sig, timeout_s):
    """SIGKILL: the peer's socket closes, the step fails at once and names the rank.
    SIGSTOP: nothing closes; the collective times out after timeout_s. Nothing hangs."""
    path, _, prompts, _ = models["llama-gqa"]
    executor = TPExecutor(engine_config(path, 2), timeout_s=timeout_s)
    victim = executor.procs[0]
    engine = Engine(engine_config(path, 2), runner=executor, tokenizer=tokenizer)
    calls = kill_at_step(executor, 3, sig)
    reqs = [Request(i, p, SamplingParams(max_new_tokens=40, ignore_eos=True))
            for i, p in enumerate(prompts)]
    with pytest.raises(RuntimeError) as info:
        for _ in engine.generate(reqs):
            pass
    elapsed = time.monotonic() - calls[2]
    message = str(info.value)
    assert len(calls) == 3 and "\n" not in message
    assert message.startswith("tensor-parallel job failed in a step: ")
    if sig == signal.SIGKILL:
        # (no "collective timeout" suffix: a kill from outside involves none)
        assert message.endswith(f"tensor-parallel rank 1 (pid {victim.pid}) killed by signal 9")
        assert elapsed < timeout_s
    else:
        assert elapsed < timeout_s + 10
    assert not victim.is_alive() and not torch.distributed.is_initialized()
    with pytest.raises(RuntimeError, match="shut down"):
        engine.runner.execute(engine.scheduler.schedule())


def test_each_rank_reads_only_its_slice(models, monkeypatch):
    """Bytes pulled out of safetensors by a rank == bytes of that rank's parameters."""
    read = []
    narrow, load = weight_utils.LazyTensor.narrow, weight_utils.LazyTensor.load

    def counting_narrow(self, dim, start, size):
        t = narrow(self, dim, start, size)
        read.append(t.numel() * t.element_size())
        return t

    def counting_load(self):
        t = load(self)
        read.append(t.numel() * t.element_size())
        return t

    monkeypatch.setattr(weight_utils.LazyTensor, "narrow", counting_narrow)
    monkeypatch.setattr(weight_utils.LazyTensor, "load", counting_load)
    for name, tp, rank in (("llama-gqa", 2, 1), ("llama-gqa", 4, 3), ("qwen3-tied", 2, 0)):
        path, hf_config, _, _ = models[name]
        model = build_model(hf_config, "float32", "cpu", rank, tp)
        read.clear()
        load_weights(model, str(path))
        assert sum(read) == model_weight_bytes(model), (name, tp, rank)
        full = model_weight_bytes(build_model(hf_config, "float32", "meta", 0, 1))
        assert sum(read) < 0.6 * full if tp == 2 else sum(read) < 0.35 * full


TORCHRUN_SCRIPT = """
import json, os, sys
from llmbatch.runtime.config import EngineConfig
from llmbatch.runtime.engine import Engine
from llmbatch.runtime.request import Request
from llmbatch.runtime.sampling_params import SamplingParams
model, prompts_file, out_file = sys.argv[1:]
engine = Engine(EngineConfig(model=model, device="cpu", dtype="float32", tensor_parallel_size=2))
# Only rank 0 gets here: the other ranks serve steps inside Engine() and exit.
assert os.environ["RANK"] == "0", os.environ["RANK"]
prompts = json.load(open(prompts_file))
reqs = [Request(i, p, SamplingParams(max_new_tokens=%d)) for i, p in enumerate(prompts)]
out = {r.request_id: r.output_token_ids for r in engine.generate(reqs)}
json.dump([out[i] for i in range(len(prompts))], open(out_file, "w"))
engine.runner.shutdown()
""" % MAX_NEW


def test_torchrun_launch_joins_the_group(models, tokenizer, tmp_path):
    """Under torchrun every process calls Engine(); rank 1 serves steps and exits cleanly."""
    import json
    import subprocess
    import sys

    from llmbatch.runtime.dist import free_port

    path, _, prompts, expected = models["llama-gqa"]
    tokenizer.save_pretrained(path)
    (tmp_path / "run.py").write_text(TORCHRUN_SCRIPT)
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(free_port()), str(tmp_path / "run.py"), str(path),
         str(tmp_path / "prompts.json"), str(tmp_path / "out.json")],
        env=env, capture_output=True, text=True, timeout=120)
    (tmp_path / "stderr.txt").write_text(proc.stderr)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "out.json").read_text()) == expected


def test_heads_that_do_not_split_are_refused_before_spawning(models):
    path = models["llama-gqa"][0]
    with pytest.raises(ValueError, match="num_attention_heads=4 is not divisible by "
                                         "tensor_parallel_size=3"):
        TPExecutor(engine_config(path, 3), timeout_s=5)
    assert not torch.distributed.is_initialized()


def test_rendezvous_detection():
    torchrun = dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="10.0.0.1",
                    MASTER_PORT="29500")
    r = detect_rendezvous(2, torchrun)
    assert (r.rank, r.world_size, r.local_rank, r.master_addr, r.master_port, r.launched) == (
        1, 2, 1, "10.0.0.1", 29500, True)
    assert r.init_method == "env://"  # torchrun's agent hosts the store
    with pytest.raises(ValueError, match="started 2 processes but tensor_parallel_size is 4"):
        detect_rendezvous(4, torchrun)
    with pytest.raises(ValueError, match="MASTER_PORT is not"):
        detect_rendezvous(2, dict(RANK="0", WORLD_SIZE="2", MASTER_ADDR="h"))
    srun = dict(SLURM_PROCID="3", SLURM_NTASKS="4", SLURM_LOCALID="1", SLURM_JOB_ID="123456",
                SLURM_JOB_NODELIST="node7")
    r = detect_rendezvous(4, srun)
    assert (r.rank, r.world_size, r.local_rank, r.init_method) == (
        3, 4, 1, f"tcp://node7:{20000 + 123456 % 10000}")
    # One SLURM task: we spawn the ranks, on the job's own port.
    r = detect_rendezvous(2, dict(SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_JOB_ID="77"))
    assert (r.rank, r.launched, r.master_port) == (0, False, 20077)
    assert slurm_port("1001") != slurm_port("1002")
    # No launcher: a free port each time, local.
    r = detect_rendezvous(2, {})
    assert (r.rank, r.world_size, r.launched, r.master_addr) == (0, 2, False, "127.0.0.1")
    assert 0 < r.master_port < 65536


def test_penalties_and_min_p_at_tp2_equal_tp1(models, tokenizer):
    """Only rank 0 samples, from the gathered logits, with the real requests' histories: mixed
    penalized / min_p / plain rows give the same tokens at tensor_parallel_size 2 as at 1."""
    path, _, prompts, _ = models["llama-gqa"]
    kinds = [dict(repetition_penalty=1.4), dict(), dict(frequency_penalty=1.0),
             dict(temperature=0.8, min_p=0.1, presence_penalty=0.5, seed=7)]
    params = [SamplingParams(max_new_tokens=MAX_NEW, **kinds[i % len(kinds)])
              for i in range(len(prompts))]

    def run(engine):
        results = {r.request_id: r for r in engine.generate(
            [Request(i, p, q) for i, (p, q) in enumerate(zip(prompts, params))])}
        return [results[i].output_token_ids for i in range(len(prompts))]

    want = run(Engine(engine_config(path, 1), tokenizer=tokenizer))
    executor = TPExecutor(engine_config(path, 2), timeout_s=TIMEOUT_S)
    try:
        assert run(Engine(engine_config(path, 2), runner=executor, tokenizer=tokenizer)) == want
    finally:
        executor.shutdown()


def test_prompt_logprobs_at_tp2_equal_tp1(models, tokenizer):
    """Every rank runs the score rows' logits (compute_logits gathers the vocabulary shards
    collectively); rank 0 alone records them: the same entries as at tensor_parallel_size 1."""
    path, _, prompts, _ = models["llama-gqa"]
    params = [SamplingParams(max_new_tokens=2, prompt_logprobs=i % 3) for i in range(8)]

    def run(engine):
        results = {r.request_id: r for r in engine.generate(
            [Request(i, p, q) for i, (p, q) in enumerate(zip(prompts, params))])}
        return [results[i].prompt_logprobs for i in range(len(params))]

    want = run(Engine(engine_config(path, 1, max_num_batched_tokens=32), tokenizer=tokenizer))
    executor = TPExecutor(engine_config(path, 2, max_num_batched_tokens=32), timeout_s=TIMEOUT_S)
    try:
        got = run(Engine(engine_config(path, 2, max_num_batched_tokens=32), runner=executor,
                         tokenizer=tokenizer))
    finally:
        executor.shutdown()
    for g, w, p in zip(got, want, prompts[:8]):
        assert len(g) == len(p) and g[0] is None
        assert [e["token_id"] for e in g[1:]] == p[1:]
        assert [e["logprob"] for e in g[1:]] == pytest.approx([e["logprob"] for e in w[1:]],
                                                               abs=1e-5)
        assert [[t for t, _ in e["top"]] for e in g[1:]] == [[t for t, _ in e["top"]]
                                                             for e in w[1:]]
