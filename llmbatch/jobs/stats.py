"""Per-shard job statistics: counts, tokens, throughput, prefix hits, latency percentiles (no torch).

One stats row per shard run is written to `_stats/stats-SSSSS-RRR.parquet`; the same summary goes
into that file's Parquet key-value metadata under b"llmbatch.stats".
"""

from __future__ import annotations

import json
import os
import time
from importlib import metadata as importlib_metadata
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq

from llmbatch.jobs.latency_sketch import LatencySketch
from llmbatch.io.layout import STATS_RE
from llmbatch.io.manifest import STATS_DIR
from llmbatch.jobs.errors import InvalidInputError
from llmbatch.one_line import one_line
from llmbatch.io.writer import write_atomic_bytes

STATS_METADATA_KEY = b"llmbatch.stats"

# Column order and types of the stats Parquet (fixed so files of many runs concatenate).
# One row per run of a shard, counting that run: rows_ok / rows_error are the rows it produced,
# rows_skipped those earlier runs had committed, rows_total the shard's rows. Summing a shard's
# rows gives its totals; the run summary and JobResult count ok/error over the whole shard.
STATS_SCHEMA = pa.schema([
    ("shard_index", pa.int64()), ("shard_count", pa.int64()), ("run", pa.int64()),
    ("start_time", pa.string()), ("end_time", pa.string()), ("wall_s", pa.float64()),
    ("rows_total", pa.int64()), ("rows_skipped", pa.int64()),
    ("rows_ok", pa.int64()), ("rows_error", pa.int64()),
    ("prompt_tokens", pa.int64()), ("cached_prompt_tokens", pa.int64()),
    ("output_tokens", pa.int64()), ("output_tok_s", pa.float64()), ("total_tok_s", pa.float64()),
    ("prefix_hit_rate", pa.float64()), ("spec_accepted_tokens", pa.int64()),
    ("ttft_mean_s", pa.float64()), ("ttft_p50_s", pa.float64()), ("ttft_p99_s", pa.float64()),
    ("tpot_mean_s", pa.float64()), ("tpot_p50_s", pa.float64()), ("tpot_p99_s", pa.float64()),
    ("gpu_name", pa.string()), ("gpu_count", pa.int64()),
    ("gpu_util_mean", pa.float64()), ("gpu_util_max", pa.float64()),
    ("gpu_mem_used_mean_bytes", pa.float64()), ("gpu_mem_used_max_bytes", pa.float64()),
    ("config_hash", pa.string()), ("seed", pa.int64()),
    ("llmbatch_version", pa.string()), ("torch_version", pa.string()),
    ("transformers_version", pa.string()),
    # From the engine: loaded weight bytes of each tensor-parallel rank, quantization method.
    ("weight_bytes_per_rank", pa.list_(pa.int64())), ("quantization", pa.string()),
])


def versions() -> dict:
    """Installed versions, read from package metadata (does not import torch)."""
    out = {}
    for key, dist in (("llmbatch_version", "llmbatch"), ("torch_version", "torch"),
                      ("transformers_version", "transformers")):
        try:
            out[key] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            out[key] = None
    if out["llmbatch_version"] is None:
        from llmbatch import __version__

        out["llmbatch_version"] = __version__
    return out


class ShardStats:
    """Accumulates the rows finished by this run of one shard."""

    def __init__(self) -> None:
        self.start_wall = time.time()
        self.start = time.perf_counter()
        self.rows_ok = 0
        self.rows_error = 0
        self.prompt_tokens = 0
        self.cached_prompt_tokens = 0
        self.output_tokens = 0
        self.spec_accepted_tokens = 0
        self.ttft = LatencySketch()
        self.tpot = LatencySketch()

    def add(self, row: dict) -> None:
        """One input row with one output row (sampling.n == 1)."""
        self.add_samples([row])

    def add_samples(self, rows: list[dict]) -> None:
        """One input row's output rows (its sampling.n samples): the row counts once, as an
        error row when any sample failed; tokens and latencies count every sample."""
        if any(row["finish_reason"] == "error" for row in rows):
            self.rows_error += 1
        else:
            self.rows_ok += 1
        for row in rows:
            self._add_tokens(row)

    def _add_tokens(self, row: dict) -> None:
        if row["finish_reason"] != "error":
            # A row rejected before the engine (e.g. over-long) computed nothing: counting its
            # prompt would inflate tok/s and deflate the prefix hit rate.
            self.prompt_tokens += row["num_prompt_tokens"] or 0
            self.cached_prompt_tokens += row["num_cached_prompt_tokens"] or 0
        self.output_tokens += row["num_output_tokens"] or 0
        self.spec_accepted_tokens += row["spec_accepted_tokens"] or 0
        if row["ttft_s"] is not None:
            self.ttft.add(row["ttft_s"])
        if row["tpot_s"] is not None:
            self.tpot.add(row["tpot_s"])

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.start

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / max(self.elapsed_s, 1e-9)

    @property
    def prefix_hit_rate(self) -> Optional[float]:
        return self.cached_prompt_tokens / self.prompt_tokens if self.prompt_tokens else None

    def summary(self, *, shard_index: int, shard_count: int, run: int, rows_total: int,
                rows_skipped: int, config_hash: str, seed: int, gpu: dict,
                engine: Optional[dict] = None) -> dict:
        """engine: Engine.stats() (or None for engines without it)."""
        wall = self.elapsed_s
        end_wall = self.start_wall + wall
        iso = lambda t: time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e3):03d}Z"
        out = {
            "shard_index": shard_index, "shard_count": shard_count, "run": run,
            "start_time": iso(self.start_wall), "end_time": iso(end_wall), "wall_s": wall,
            "rows_total": rows_total, "rows_skipped": rows_skipped,
            "rows_ok": self.rows_ok, "rows_error": self.rows_error,
            "prompt_tokens": self.prompt_tokens, "cached_prompt_tokens": self.cached_prompt_tokens,
            "output_tokens": self.output_tokens,
            "output_tok_s": self.output_tokens / wall if wall > 0 else None,
            "total_tok_s": (self.prompt_tokens + self.output_tokens) / wall if wall > 0 else None,
            "prefix_hit_rate": self.prefix_hit_rate,
            "spec_accepted_tokens": self.spec_accepted_tokens,
            "ttft_mean_s": self.ttft.mean, "ttft_p50_s": self.ttft.percentile(50),
            "ttft_p99_s": self.ttft.percentile(99),
            "tpot_mean_s": self.tpot.mean, "tpot_p50_s": self.tpot.percentile(50),
            "tpot_p99_s": self.tpot.percentile(99),
            "config_hash": config_hash, "seed": seed,
        }
        out.update({k: gpu.get(k) for k in ("gpu_name", "gpu_count", "gpu_util_mean",
                                             "gpu_util_max", "gpu_mem_used_mean_bytes",
                                             "gpu_mem_used_max_bytes")})
        out.update(versions())
        engine = engine or {}
        per_rank = engine.get("weight_bytes_per_rank")
        out["weight_bytes_per_rank"] = [int(b) for b in per_rank] if per_rank is not None else None
        out["quantization"] = engine.get("quantization")
        return out


def next_run_index(out_dir: str, shard: int) -> int:
    path = os.path.join(out_dir, STATS_DIR)
    if not os.path.isdir(path):
        return 0
    # One past the highest run index of this shard, not the count of its files: with a run's
    # file deleted by hand, the count named an existing file, and write_stats replaced it.
    runs = [int(m.group(2)) for m in map(STATS_RE.match, os.listdir(path))
            if m and int(m.group(1)) == shard]
    return max(runs) + 1 if runs else 0


def write_stats(out_dir: str, summary: dict) -> str:
    """One-row stats Parquet (atomic), summary also in its key-value metadata."""
    directory = os.path.join(out_dir, STATS_DIR)
    os.makedirs(directory, exist_ok=True)
    table = pa.Table.from_pylist([summary], schema=STATS_SCHEMA)
    table = table.replace_schema_metadata(
        {STATS_METADATA_KEY: json.dumps(summary, sort_keys=True, default=str).encode()})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    path = os.path.join(directory, f"stats-{summary['shard_index']:05d}-{summary['run']:03d}.parquet")
    write_atomic_bytes(path, sink.getvalue().to_pybytes())
    return path


def read_stats(out_dir: str) -> pa.Table:
    """All stats rows of an output folder, ordered by (shard, run)."""
    directory = os.path.join(out_dir, STATS_DIR)
    # Ordered by the numbers, not the names: past shard 99999 the index has six digits, and
    # "stats-100000-000" sorts before "stats-99999-000".
    matches = [m for m in map(STATS_RE.match, os.listdir(directory)) if m] \
        if os.path.isdir(directory) else []
    files = [m.group(0) for m in sorted(matches, key=lambda m: (int(m.group(1)),
                                                                 int(m.group(2))))]
    tables = []
    for name in files:
        path = os.path.join(directory, name)
        try:   # (an older file lacking a newer column reads it as nulls)
            tables.append(pq.read_table(path, schema=STATS_SCHEMA))
        except (pa.ArrowException, OSError) as exc:
            # A damaged or foreign file was a traceback (exit 1) of `llmbatch stats`.
            raise InvalidInputError(f"{path}: not a stats file llmbatch can read "
                                    f"({one_line(exc, with_type=True)})") \
                from None
    return pa.concat_tables(tables) if tables else STATS_SCHEMA.empty_table()
