"""runtime/device_timing.py: per-step device time from events (forward, sampling, idle gap),
summed per step kind into engine.stats(). CUDA events are faked by host clocks here; the
arithmetic and the wiring through ModelRunner.launch / LaunchedStep.result are what is tested."""

from __future__ import annotations

import time

import pytest

from llmbatch.runtime import device_timing


class ScriptedEvent:
    """An event whose record() takes the next time (ms) from a script."""

    def __init__(self, clock):
        self._clock, self.t, self.synced = clock, None, False

    def record(self):
        self.t = next(self._clock)

    def synchronize(self):
        self.synced = True

    def elapsed_time(self, other):
        assert self.t is not None and other.t is not None, "elapsed_time of an unrecorded event"
        return other.t - self.t


def test_forward_sample_and_gap_are_summed_per_kind():
    # Step 1 (eager): start 0, mid 5, end 6. Step 2 (graph): start 7.5, mid 8.5, end 9.
    # Step 3 (graph): start 9 (no gap), mid 10, end 10.25.
    clock = iter([0.0, 5.0, 6.0, 7.5, 8.5, 9.0, 9.0, 10.0, 10.25])
    timer = device_timing.DeviceStepTimer(lambda: ScriptedEvent(clock))
    for kind in ("eager", "graph", "graph"):
        marks = timer.begin()
        timer.after_forward(marks)
        timer.after_sampling(marks)
        timer.account(kind, marks)
        assert marks.end.synced
    s = timer.stats()
    assert s["device_timed_steps"] == 3
    assert s["eager_device_forward_s"] == pytest.approx(5e-3)
    assert s["eager_device_sample_s"] == pytest.approx(1e-3)
    assert s["eager_device_gap_s"] == 0.0           # the first step has no predecessor
    assert s["graph_device_forward_s"] == pytest.approx(2e-3)
    assert s["graph_device_sample_s"] == pytest.approx(0.75e-3)
    assert s["graph_device_gap_s"] == pytest.approx(1.5e-3)


def test_engine_reports_device_time_of_every_step_while_enabled(tmp_path):
    from llmbatch.runtime.config import EngineConfig
    from llmbatch.runtime.engine import Engine
    from llmbatch.runtime.request import Request
    from llmbatch.runtime.sampling_params import SamplingParams
    from tests.runtime.tiny_models import make_model, make_prompts, make_tokenizer

    tokenizer = make_tokenizer(tmp_path / "tok")
    make_model(tmp_path, arch="llama", num_heads=4, num_kv_heads=2, head_dim=16)
    engine = Engine(EngineConfig(model=str(tmp_path), device="cpu", dtype="float32"),
                    tokenizer=tokenizer)
    assert "device_timed_steps" not in engine.stats()   # off by default
    # CPU "device": the forward runs inside the launch, so host clocks stand in for events.
    host_ms = iter(lambda: time.perf_counter() * 1e3, None)
    device_timing.enable(engine.runner, lambda: ScriptedEvent(host_ms))
    requests = [Request(i, p, SamplingParams(max_new_tokens=4))
                for i, p in enumerate(make_prompts(2))]
    outputs = {o.request_id: o.output_token_ids for o in engine.generate(requests)}
    assert all(outputs.values())
    s = engine.stats()
    assert s["device_timed_steps"] == s["eager_steps"] >= 4
    # The forward dominates a CPU step and lies within the host's step time.
    assert 0.0 < s["eager_device_forward_s"] <= s["eager_step_s"]
    assert s["eager_device_sample_s"] >= 0.0 and s["eager_device_gap_s"] >= 0.0
    timer = device_timing.disable(engine.runner)
    assert timer.steps == s["device_timed_steps"]
    # Timing changes nothing in the outputs, and stops when disabled.
    again = {o.request_id: o.output_token_ids
             for o in engine.generate([Request(i + 10, p, SamplingParams(max_new_tokens=4))
                                       for i, p in enumerate(make_prompts(2))])}
    assert [again[i + 10] for i in range(2)] == [outputs[i] for i in range(2)]
    assert "device_timed_steps" not in engine.stats()


def test_bench_batch1_device_timing_pass_reports_us_per_graph_and_eager_step(llama_setup):
    from bench.bench_batch1 import device_timing_pass
    from bench.workloads import build
    from llmbatch.runtime.config import EngineConfig
    from llmbatch.runtime.engine import Engine
    from tests.runtime.tiny_models import VOCAB

    path, tok = llama_setup
    engine = Engine(EngineConfig(model=str(path), device="cpu", dtype="float32"), tokenizer=tok)
    workload = build("W-BATCH1", VOCAB, 0.02)
    host_ms = iter(lambda: time.perf_counter() * 1e3, None)
    t = device_timing_pass(engine, workload, lambda: ScriptedEvent(host_ms))
    assert engine.runner.device_timer is None            # switched off again
    assert t["eager_steps"] == t["device_timed_steps"] > 1 and t["graph_steps"] == 0
    assert t["graph_device_forward_us_per_step"] is None  # no graph step on the CPU
    assert 0.0 < t["eager_device_forward_us_per_step"] <= t["eager_step_us_per_step"]
    assert t["tpot_s"] > 0.0
    assert t["graph_replay_back_to_back_us"] is None      # no captured graph on the CPU


def test_a_failing_timer_turns_itself_off_and_the_step_completes(tmp_path):
    from llmbatch.runtime.config import EngineConfig
    from llmbatch.runtime.engine import Engine
    from llmbatch.runtime.request import Request
    from llmbatch.runtime.sampling_params import SamplingParams
    from tests.runtime.tiny_models import make_model, make_prompts, make_tokenizer

    class BrokenEvent(ScriptedEvent):
        def elapsed_time(self, other):
            raise RuntimeError("event not recorded")

    tokenizer = make_tokenizer(tmp_path / "tok")
    make_model(tmp_path, arch="llama", num_heads=4, num_kv_heads=2, head_dim=16)
    engine = Engine(EngineConfig(model=str(tmp_path), device="cpu", dtype="float32"),
                    tokenizer=tokenizer)
    host_ms = iter(lambda: time.perf_counter() * 1e3, None)
    device_timing.enable(engine.runner, lambda: BrokenEvent(host_ms))
    done = list(engine.generate([Request(0, make_prompts(1)[0],
                                         SamplingParams(max_new_tokens=3))]))
    assert len(done) == 1 and len(done[0].output_token_ids) == 3
    assert engine.runner.device_timer is None
