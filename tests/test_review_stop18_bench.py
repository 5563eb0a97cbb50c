"""Review of 3d2a25f / e4d7bbf (stop 18's bench rows): bench/gpu_check.sh's budget comments and
reserves against what the scripts now run. gpu_check is the one GPU call of a session, so a
reserve or row count that is off costs measured rows, not a failing test; these keep them in
step with bench/batch1_options.py, bench/bench_gemv_layouts.py and the default A/B rows."""

from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_CHECK = open(os.path.join(ROOT, "bench", "gpu_check.sh")).read()
# 93823c5 sized the --skip-peers reserve for 5 engines at 130 s: 26 s an engine (load, warm-up,
# W-RANDOM / W-PREFIX / W-BATCH1 and a batch-1 profile each), + ~6 s since bench.run runs the
# three workloads 3 times an engine on a GPU (--repeats; ~3 s a run on stop 20's H200).
SECONDS_AN_ENGINE = 130 / 5 + 6


def _comment() -> str:
    """The script's comments as one line (numbers may wrap)."""
    return " ".join(line.lstrip("# ").strip() for line in GPU_CHECK.splitlines()
                    if line.lstrip().startswith("#"))


def test_batch1_sweep_row_counts_match_the_options():
    """The sweep's comment: its default rows, the options --all adds and the --all total
    (3d2a25f said 11 options and 18 rows; --all has 12 options more, 19 rows, and the winners
    row when an option wins)."""
    from bench.batch1_options import options

    short, every = len(options()), len(options(all_rows=True))
    text = _comment()
    m = re.search(r"\((\d+) rows since stop \d+:", text)
    assert m and int(m.group(1)) == short, m and m.group(0)
    m = re.search(r"BENCH_BATCH1_ARGS=--all adds the (\d+) options measured slower; (\d+) rows",
                  text)
    assert m, "the --all sentence moved"
    assert (int(m.group(1)), int(m.group(2))) == (every - short, every)


def test_gemv_layouts_tile_count_matches_the_tile_list():
    """e4d7bbf made the list 7 tiles besides the table's pick; the comment said 6."""
    from bench.bench_gemv_layouts import _GEMV_TILES

    m = re.search(r"our one-row Triton GEMV \(layers/gemv\.py\) at (\d+) tiles", _comment())
    assert m and int(m.group(1)) == len(_GEMV_TILES), m and m.group(0)


def test_skip_peers_reserve_covers_the_default_engines():
    """Each A/B variant on by default on a GPU is one more engine in a --skip-peers bench;
    3d2a25f added the 6th (rotary-attn) and kept 5 engines' 130 s, so a focused call's pytest
    could take the time the last A/B rows (the new rotary rows, run last) need."""
    defaults_on = re.findall(r'\$\{BENCH_\w+_ROWS:-\$AB_DEFAULT\}" = 1 \] && MODE_ARGS\+=',
                             GPU_CHECK)
    engines = 1 + len(defaults_on)   # the llmbatch engine and one per default A/B variant
    m = re.search(r'\*" --skip-peers "\*\) PYTEST_RESERVE=\$\{BENCH_RESERVE:-(\d+)\}',
                  GPU_CHECK)
    assert m
    assert int(m.group(1)) >= engines * SECONDS_AN_ENGINE, (engines, m.group(0))
    header = re.search(r"default 220, (\d+) with --skip-peers in BENCH_ARGS", _comment())
    keep = re.search(r"the bench ~220 s with peers, ~(\d+) s without", _comment())
    assert header and keep and int(header.group(1)) == int(keep.group(1)) == int(m.group(1))
