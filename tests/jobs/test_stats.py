"""Stats: percentiles, per-run accumulation, stats file + key-value metadata, GPU monitor nulls."""

import json

import pyarrow.parquet as pq

from llmbatch.jobs.gpu_monitor import GpuMonitor
from llmbatch.jobs.progress import Progress
from llmbatch.jobs.latency_sketch import exact_percentile as percentile
from llmbatch.jobs.stats import (STATS_METADATA_KEY, ShardStats, next_run_index,
                                 read_stats, write_stats)


def test_percentile_linear_interpolation():
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile(list(range(101)), 99) == 99.0
    assert percentile([0.0, 10.0], 99) == 9.9


def row(reason="stop", prompt=10, cached=4, out=3, ttft=0.1, tpot=0.01):
    return {"finish_reason": reason, "num_prompt_tokens": prompt,
            "num_cached_prompt_tokens": cached, "num_output_tokens": out, "ttft_s": ttft,
            "tpot_s": tpot, "spec_accepted_tokens": 1}


def test_shard_stats_summary_and_file(tmp_path):
    s = ShardStats()
    s.add(row())
    s.add(row(ttft=0.3, tpot=0.03))
    s.add(row("error", prompt=0, cached=0, out=0, ttft=None, tpot=None))
    summary = s.summary(shard_index=1, shard_count=2, run=0, rows_total=5, rows_skipped=2,
                        config_hash="abc", seed=7, gpu=GpuMonitor().summary())
    assert (summary["rows_ok"], summary["rows_error"], summary["prompt_tokens"],
            summary["cached_prompt_tokens"], summary["output_tokens"],
            summary["spec_accepted_tokens"]) == (2, 1, 20, 8, 6, 3)
    assert summary["prefix_hit_rate"] == 0.4
    assert abs(summary["ttft_mean_s"] - 0.2) < 1e-12 and abs(summary["ttft_p50_s"] - 0.2) < 1e-12
    assert abs(summary["tpot_p99_s"] - 0.0298) < 1e-12
    assert summary["gpu_name"] is None and summary["gpu_util_mean"] is None
    assert summary["torch_version"] and summary["transformers_version"]
    assert summary["llmbatch_version"]
    assert next_run_index(str(tmp_path), 1) == 0
    path = write_stats(str(tmp_path), summary)
    assert path.endswith("_stats/stats-00001-000.parquet")
    assert next_run_index(str(tmp_path), 1) == 1
    meta = json.loads(pq.read_schema(path).metadata[STATS_METADATA_KEY])
    assert meta["config_hash"] == "abc" and meta["rows_ok"] == 2
    assert read_stats(str(tmp_path)).to_pylist()[0]["seed"] == 7


def test_gpu_monitor_without_gpu_is_null():
    with GpuMonitor(interval_s=0.01) as mon:
        pass
    import torch

    if not torch.cuda.is_available():
        assert mon.summary() == {"gpu_name": None, "gpu_count": None, "gpu_util_mean": None,
                                 "gpu_util_max": None, "gpu_mem_used_mean_bytes": None,
                                 "gpu_mem_used_max_bytes": None}


def test_progress_log_lines(capsys):
    import io

    stream = io.StringIO()
    p = Progress("log", total=4, initial=1, log_every_s=3600, stream=stream)
    p.update(1, 10.0, None)            # not yet: interval not reached
    p.update(2, 12.5, 0.25)            # last row: always logged
    p.write("a message")
    p.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("llmbatch: 4/4 rows (100.0%), out 12.5 tok/s, prefix hit 25.0%")
    assert lines[1] == "a message"


def test_progress_bar_messages_on_their_own_line():
    import io

    stream = io.StringIO()
    p = Progress("bar", total=10, stream=stream)
    p.update(3, 5.0, 0.5)
    p.write("hello from the runner")
    p.close()
    text = stream.getvalue()
    # tqdm clears the bar line, prints the message as a whole line, then redraws the bar.
    assert "\rhello from the runner\n\rrows:  30%" in text
    assert "3/10" in text and "out 5.0 tok/s, prefix hit 50.0%" in text


def test_latency_sketch_is_exact_when_small_and_within_one_percent_when_large():
    import random

    from llmbatch.jobs.latency_sketch import LatencySketch, exact_percentile

    rng = random.Random(0)
    small = LatencySketch(exact_limit=100)
    values = [rng.uniform(0.001, 2.0) for _ in range(100)]
    for v in values:
        small.add(v)
    assert small.percentile(50) == exact_percentile(values, 50)
    assert small.percentile(99) == exact_percentile(values, 99)

    big = LatencySketch(exact_limit=100)
    values = [rng.lognormvariate(-4.0, 1.0) for _ in range(20_000)] + [0.0] * 10
    for v in values:
        big.add(v)
    assert big.count == len(values)
    assert abs(big.mean - sum(values) / len(values)) < 1e-12
    for q in (50, 90, 99):
        want = sorted(values)[max(1, -(-q * len(values) // 100)) - 1]
        assert abs(big.percentile(q) - want) <= 0.01 * want, q
    assert big.percentile(0) == 0.0      # zeros share the lowest bucket


def test_stats_rows_count_their_own_run_the_result_counts_the_shard(tmp_path, jobkit,
                                                                    tiny_tokenizer_dir,
                                                                    fake_engine_env):
    # A resume that finds every row done: its summary says "4 ok ... 4 resumed" (the shard)
    # while its stats row says rows_ok 0 (the run); documented, not a disagreement.
    from llmbatch import run_job

    inp = jobkit.write_prompts(str(tmp_path / "in.parquet"), 4)
    out = str(tmp_path / "out")
    job = jobkit.make_job(tiny_tokenizer_dir, inp, out)
    run_job(job)
    again = run_job(job)
    assert (again.num_rows_ok, again.num_rows_skipped) == (4, 4)
    rows = read_stats(out).to_pylist()
    assert [(r["run"], r["rows_total"], r["rows_skipped"], r["rows_ok"], r["rows_error"])
            for r in rows] == [(0, 4, 0, 4, 0), (1, 4, 4, 0, 0)]


def test_the_next_run_index_follows_the_highest_not_the_count(tmp_path):
    """With run 0's file deleted by hand, the count of files (2) named run 2's existing file,
    and the next run's stats replaced it."""
    stats = tmp_path / "_stats"
    stats.mkdir()
    for name in ("stats-00000-001.parquet", "stats-00000-002.parquet", "stats-00001-007.parquet",
                 "_tmp-stats-00000-009.parquet.12", "stats-00000-notes.txt"):
        (stats / name).write_text("x")
    assert next_run_index(str(tmp_path), 0) == 3
    assert next_run_index(str(tmp_path), 1) == 8
    assert next_run_index(str(tmp_path), 2) == 0
