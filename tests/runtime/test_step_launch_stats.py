"""engine.stats() splits each step kind's forward + sampling time into the host's launch part
(`eager_launch_s`, `graph_launch_s`): how the next GPU run tells a host-bound eager prefill
(W-BATCH1's TTFT) from a device-bound one."""

from __future__ import annotations


def test_launch_time_is_counted_within_the_step_time(tmp_path):
    from llmbatch.runtime.config import EngineConfig
    from llmbatch.runtime.engine import Engine
    from llmbatch.runtime.request import Request
    from llmbatch.runtime.sampling_params import SamplingParams
    from tests.runtime.tiny_models import make_model, make_prompts, make_tokenizer

    tokenizer = make_tokenizer(tmp_path / "tok")
    make_model(tmp_path, arch="llama", num_heads=4, num_kv_heads=2, head_dim=16)
    engine = Engine(EngineConfig(model=str(tmp_path), device="cpu", dtype="float32"),
                    tokenizer=tokenizer)
    before = engine.stats()
    assert (before["eager_launch_s"], before["graph_launch_s"]) == (0.0, 0.0)
    requests = [Request(i, p, SamplingParams(max_new_tokens=4))
                for i, p in enumerate(make_prompts(2))]
    list(engine.generate(requests))
    s = engine.stats()
    assert s["eager_steps"] >= 4
    # On the CPU the forward runs inside the launch: most of the step, never more than it.
    assert 0.0 < s["eager_launch_s"] <= s["eager_step_s"]
    assert s["graph_launch_s"] == 0.0
