"""The job stats Parquet records the loaded weight bytes of each rank and the quantization
method (tiny real-engine jobs, float32 on CPU, unquantized and nf4)."""

import pytest

from llmbatch.jobs.stats import read_stats

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _expected_bytes(model_dir: str, method: str) -> int:
    """Bytes the runtime should report, from the checkpoint's shapes: float32 everywhere, except
    that nf4 linear weights take 0.5 byte per weight plus one float32 absmax per 64 weights."""
    from safetensors import safe_open

    total = 0
    with safe_open(f"{model_dir}/model.safetensors", framework="pt") as f:
        for name in f.keys():
            shape = f.get_slice(name).get_shape()
            numel = 1
            for d in shape:
                numel *= d
            if method == "nf4" and name.split(".")[-2] in LINEAR:
                assert numel % 64 == 0   # one flat tensor per fused layer: no partial blocks
                total += numel // 2 + numel // 64 * 4
            else:
                total += numel * 4
    return total


@pytest.mark.parametrize("method", ["none", "nf4"])
def test_stats_record_weight_bytes_and_quantization(method, tmp_path, tiny_llama_dir, jobkit,
                                                    monkeypatch):
    pytest.importorskip("llmbatch.runtime.engine")
    if method != "none":
        pytest.importorskip("bitsandbytes")
    from llmbatch import run_job

    monkeypatch.delenv("LLMBATCH_ENGINE_FACTORY", raising=False)
    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 3, seed=2)
    out = str(tmp_path / "out")
    result = run_job(jobkit.make_job(
        tiny_llama_dir, inp, out, sampling={"max_new_tokens": 2},
        model={"path": tiny_llama_dir, "dtype": "float32"},
        engine={"kv_cache_blocks": 16, "device": "cpu"},
        quantization={"method": method}))
    assert (result.num_rows_ok, result.exit_code) == (3, 0)
    expected = _expected_bytes(tiny_llama_dir, method)
    assert result.extra["engine_stats"]["weight_bytes_per_rank"] == [expected]
    assert result.extra["engine_stats"]["quantization"] == method
    stats = read_stats(out).to_pylist()
    assert len(stats) == 1
    assert stats[0]["weight_bytes_per_rank"] == [expected]
    assert stats[0]["quantization"] == method
