"""Review of the one-launch decode attention (triton_kernels/rotary_decode.py): what the
interpreter tests of test_rotary_decode_attention.py could not fail on.

The interpreter runs a launch's programs one after another, split index innermost and
ascending. So a program that reads the new token's slot is only caught reading it before it is
stored when it runs BEFORE the storing program: with a wrong owner that is a LOWER split than
the one whose keys hold the new token (e.g. split 0 always), every split-KV case there still
passes, though on a GPU the reader races with the store. Here every comparison also runs with
the grid walked in reverse (the owner's readers then run first and read the NaN-poisoned slot),
and one mutant (split 0 stores) shows the reversed walk fails it.

Verify-like steps (spans of 2..8 tokens, each one query tile) get the same reversed walk
(SPAN_SWEEP) and the same mutant.

Also: split counts that are not powers of two (3, 7; 5 and 6 were checked once, cut for CI
time), pages of 1 and 8 tokens, pages
wider than the key tile, head_dim 16 and 256, groups of 6 and 16, and sequence lengths at tile
and split boundaries; and CUDA-graph padding rows (seq_len 1, block-table row of zeros, slot
-1) next to a real row that stores into block 0.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re

import pytest
import torch

pytest.importorskip("triton")

from tests.runtime.test_rotary_decode_attention import (  # noqa: E402
    assert_bitwise, rotary_inputs, run_two_ways)
from tests.runtime.test_triton_attention import _INTERPRETED, make_case  # noqa: E402

pytestmark = pytest.mark.skipif(not _INTERPRETED, reason="runs under TRITON_INTERPRET=1 on CPU")


def _reverse_grid(monkeypatch) -> None:
    """Make the interpreter walk each launch's grid with every axis reversed."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder

    def reversed_idx(x, y, z):
        gx, gy, gz = builder.grid_dim
        builder.grid_idx = (gx - 1 - x, gy - 1 - y, gz - 1 - z)

    monkeypatch.setattr(builder, "set_grid_idx", reversed_idx)


@pytest.fixture(params=["forward", "reversed"])
def grid_order(request, monkeypatch):
    """The interpreter's walk over each launch's grid: as it is, or every axis reversed."""
    if request.param == "reversed":
        _reverse_grid(monkeypatch)
    return request.param


@pytest.fixture
def reversed_grid(monkeypatch):
    """The grid walked in reverse only: the forward walk is the interpreter's own order, which
    test_rotary_decode_attention.py's cases run in (the sweep below costs ~10 s a case)."""
    _reverse_grid(monkeypatch)


# Cached keys per span: a new key at the last / first position of a 16-key tile (15, 16), at
# the end of a run of tiles where the tiles per split double (47, 63, 127), past them (200),
# and a 1-key sequence (0). (14, 31, 95, 111, 191 were checked once, cut for CI time.)
BOUNDARY_LENS = [0, 15, 16, 47, 63, 127, 200]

# (name, num_heads, num_kv_heads, head_dim, block_size, backend kwargs)
SWEEP = [
    *[(f"splits{s}{'_fused' if f else ''}", 8, 2, 32, 16,
       dict(num_kv_splits=s, tile_n=16, fused_split_reduce=f))
      for s in (3, 7) for f in (False, True)],   # 5 and 6 behave as 3 and 7 (CI time)
    ("block1_splits3", 4, 2, 32, 1, dict(num_kv_splits=3, tile_n=16)),
    ("block8_splits4", 4, 2, 32, 8, dict(num_kv_splits=4, tile_n=16)),
    ("block64_tile16_splits5", 4, 2, 32, 64, dict(num_kv_splits=5, tile_n=16)),
    ("group16_splits3", 16, 1, 32, 16, dict(num_kv_splits=3, tile_n=16)),
    ("group6_splits3", 12, 2, 32, 16, dict(num_kv_splits=3, tile_n=16)),
    ("hd256_splits3", 4, 2, 256, 16, dict(num_kv_splits=3)),
    ("hd16_splits3", 4, 2, 16, 16, dict(num_kv_splits=3, tile_n=16)),
    ("unsplit", 8, 2, 32, 16, dict(num_kv_splits=1, tile_n=16)),
]


def _check(case, backend, heads, dtype):
    q, k, v, cos, sin = rotary_inputs(case, heads, dtype, table=True)
    fused, two = run_two_ways(case, backend, q, k, v, cos, sin)
    assert not torch.isnan(fused[0]).any(), "an output read an unwritten (NaN) slot"
    assert_bitwise(fused, two)


@pytest.mark.parametrize("name,heads,kv_heads,head_dim,block_size,kwargs", SWEEP,
                         ids=[c[0] for c in SWEEP])
def test_equals_two_launches_in_reversed_program_order(poisoned_empty, reversed_grid, name,
                                                       heads, kv_heads, head_dim, block_size,
                                                       kwargs):
    from llmbatch.runtime.attention.triton_backend import TritonAttentionBackend

    dtype = torch.bfloat16 if name.startswith("splits3") else torch.float32
    case = make_case([(c, 1) for c in BOUNDARY_LENS], heads, kv_heads, head_dim, block_size,
                     dtype)
    _check(case, TritonAttentionBackend(**kwargs), heads, dtype)


# Verify-like steps: spans of 2..8 tokens, each one query tile whose programs store the keys
# of their own splits. 5-token spans ending at the boundary lengths above (so their keys
# straddle tiles and splits), beside ragged ones; float32 (no bfloat16 in new interpreter
# tests). group6: 64 rows // 6 = a BLOCK_Q of 10 tokens, not a power of two.
SPAN_SWEEP = [c for c in SWEEP if c[0] in (
    "splits3", "splits7_fused", "block1_splits3", "block8_splits4", "group6_splits3",
    "hd16_splits3", "unsplit")]
SPAN_STEPS = [(max(c - 4, 0), 5) for c in BOUNDARY_LENS] + [(9, 2), (0, 0), (33, 8), (62, 3)]


@pytest.mark.parametrize("name,heads,kv_heads,head_dim,block_size,kwargs", SPAN_SWEEP,
                         ids=[c[0] for c in SPAN_SWEEP])
def test_span_steps_equal_two_launches_in_reversed_program_order(
        poisoned_empty, reversed_grid, name, heads, kv_heads, head_dim, block_size, kwargs):
    from llmbatch.runtime.attention.triton_backend import TritonAttentionBackend

    case = make_case(SPAN_STEPS, heads, kv_heads, head_dim, block_size, torch.float32)
    _check(case, TritonAttentionBackend(**kwargs), heads, torch.float32)


def _owner_split0_kernel(tmp_path: pathlib.Path):
    """rotary_decode.py's kernel with every K/V store moved to split 0 (the mutant)."""
    from llmbatch.runtime.attention.triton_kernels import rotary_decode

    src = pathlib.Path(rotary_decode.__file__).read_text()
    src, n = re.subn(r"owner = split == \(key_pos // TILE_N\) // split_tiles\("
                     r"tl\.cdiv\(seq_len, TILE_N\),\s*NUM_SPLITS\)",
                     "owner = key_pos * 0 + split == 0", src)   # a vector, as the real one
    assert n == 1, "the owner expression moved: update the mutant"
    path = tmp_path / "rotary_decode_owner0.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("rotary_decode_owner0", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._rotary_decode_kernel


@pytest.mark.parametrize("spans", [[(300, 1), (17, 1)], [(300, 5), (30, 5)]],
                         ids=["decode", "spans"])
def test_reversed_walk_catches_a_wrong_owner_split(poisoned_empty, grid_order, monkeypatch,
                                                   tmp_path, spans):
    """The mutant (split 0 stores the new keys) passes in the interpreter's own order, where
    split 0 runs before the splits that read the keys; reversed, the readers run first, read
    the poisoned slots, and the comparison fails. On a GPU the mutant is a race. (Spans: 30 +
    5 keys straddle splits 1 and 2.)"""
    from llmbatch.runtime.attention.triton_backend import TritonAttentionBackend
    from llmbatch.runtime.attention.triton_kernels import rotary_decode

    monkeypatch.setattr(rotary_decode, "_rotary_decode_kernel", _owner_split0_kernel(tmp_path))
    case = make_case(spans, 8, 2, 64, 16, torch.float32)
    backend = TritonAttentionBackend(num_kv_splits=4, tile_n=16)
    if grid_order == "forward":
        _check(case, backend, 8, torch.float32)   # the blind spot
    else:
        with pytest.raises(AssertionError):
            _check(case, backend, 8, torch.float32)


def test_cuda_graph_padding_rows_beside_a_store_into_block0(poisoned_empty, grid_order):
    """A decode graph's padding rows (token at position 0, seq_len 1, block-table row of zeros,
    slot -1) read block 0's first slot; a real row may store its new key exactly there in the
    same launch. The real rows equal the two launches whatever the program order, and nothing
    is stored for the padding rows."""
    from llmbatch.runtime.attention.triton_backend import TritonAttentionBackend

    heads, kv_heads, head_dim, bs = 8, 2, 32, 16
    case = make_case([(16, 1), (40, 1)], heads, kv_heads, head_dim, bs, torch.float32)
    meta = case.meta
    # Row 0's new key (position 16) goes to slot 0 of block 0: the row's second page is 0.
    first = int(meta.block_tables[0, 1])
    if first != 0:   # swap pages `first` and 0 everywhere (tables and caches)
        for cache in (case.k_cache, case.v_cache):
            tmp = cache[0].clone()
            cache[0] = cache[first]
            cache[first] = tmp
        bt = meta.block_tables
        zero, moved = bt == 0, bt == first
        bt[zero], bt[moved] = first, 0
        slots = meta.slot_mapping
        blk = slots // bs
        slots[:] = torch.where(blk == first, slots % bs,
                               torch.where(blk == 0, first * bs + slots % bs, slots))
    assert int(meta.slot_mapping[0]) == 0
    # Two padding rows, as cuda_graphs.py stages them.
    pad = 2
    n = case.query.shape[0]
    gen = torch.Generator().manual_seed(7)
    case.query = torch.cat([case.query, torch.randn(pad, heads, head_dim, generator=gen)])
    case.key = torch.cat([case.key, torch.randn(pad, kv_heads, head_dim, generator=gen)])
    case.value = torch.cat([case.value, torch.randn(pad, kv_heads, head_dim, generator=gen)])
    meta.slot_mapping = torch.cat([meta.slot_mapping, torch.full((pad,), -1)])
    meta.seq_lens = torch.cat([meta.seq_lens, torch.ones(pad, dtype=torch.int32)])
    meta.block_tables = torch.cat([meta.block_tables, torch.zeros(pad, meta.block_tables.shape[1],
                                                                  dtype=torch.int32)])
    meta.query_start_loc = torch.arange(n + pad + 1, dtype=torch.int32)
    meta.query_start_loc_cpu = list(range(n + pad + 1))
    meta.seq_lens_cpu = meta.seq_lens.tolist()
    q, k, v, cos, sin = rotary_inputs(case, heads, torch.float32, table=True)
    # Padding rows: position 0's cos/sin.
    cos[n:], sin[n:] = 1.0, 0.0
    fused, two = run_two_ways(case, TritonAttentionBackend(num_kv_splits=2, tile_n=16),
                              q, k, v, cos, sin)
    # Caches whole (padding stored nothing), real rows' outputs; the padding rows' outputs
    # (discarded by the graph runner) depend on whether they ran before the store.
    assert_bitwise((fused[0][:n], fused[1], fused[2]), (two[0][:n], two[1], two[2]))
