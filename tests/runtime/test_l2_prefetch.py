"""layers/l2_prefetch.py: the touch kernel loads every word of a weight exactly where the
word is (a planted sentinel is found at the first, a middle and the last word, for sizes that
are not a multiple of a block and grids that loop), writes nothing but its flags, and
prefetch_words gives the weight's own memory as int32 or refuses. Kernel under the Triton
interpreter (CPU)."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from llmbatch.runtime.layers import l2_prefetch as lp  # noqa: E402

needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="kernel on CPU tensors needs TRITON_INTERPRET=1")


def test_grid_covers_every_block():
    B = lp.BLOCK_WORDS
    assert lp.grid_size(1) == (1, 1)
    assert lp.grid_size(B) == (1, 1)
    assert lp.grid_size(B + 1) == (2, 1)
    assert lp.grid_size(3 * B, max_programs=2) == (2, 2)
    assert lp.grid_size(5 * B + 7, max_programs=2) == (2, 3)
    # The 1B shape's o_proj (2048 x 2048 bf16: 2,097,152 words, 512 blocks): 264 programs x 2.
    assert lp.grid_size(2048 * 2048 // 2) == (264, 2)


def test_prefetch_words_is_a_view_of_the_weight():
    w = torch.arange(12, dtype=torch.bfloat16).reshape(3, 4)
    words = lp.prefetch_words(w)
    assert words.dtype == torch.int32 and words.numel() == 6
    assert words.data_ptr() == w.data_ptr()
    assert torch.equal(words.view(torch.bfloat16).reshape(3, 4), w)
    assert lp.prefetch_words(w.t()) is None                        # not contiguous
    assert lp.prefetch_words(torch.zeros(3, dtype=torch.bfloat16)) is None   # 6 bytes
    assert lp.prefetch_words(torch.zeros(8, dtype=torch.bfloat16)[1:7]) is None  # offset 2 B


@needs_interpreter
@pytest.mark.parametrize("n_words,max_programs", [(1, 264), (5000, 264), (3 * 4096 + 5, 2),
                                                  (9 * 4096, 4)])
def test_every_word_is_loaded(n_words, max_programs, monkeypatch):
    monkeypatch.setattr(lp, "MAX_PROGRAMS", max_programs)
    programs, iters = lp.grid_size(n_words)
    words = torch.zeros(n_words, dtype=torch.int32)
    for where in sorted({0, n_words // 2, n_words - 1}):
        words.zero_()
        words[where] = lp.SENTINEL
        flags = torch.full((max_programs,), -1, dtype=torch.int32)
        lp.l2_touch(words, flags)
        # Block b of the word is loaded by program b % programs; every program stores its flag.
        expected = torch.zeros(programs, dtype=torch.int32)
        expected[(where // lp.BLOCK_WORDS) % programs] = 1
        assert torch.equal(flags[:programs], expected), (where, programs, iters)
        assert torch.equal(flags[programs:], torch.full((max_programs - programs,), -1,
                                                        dtype=torch.int32))
        assert int(words.sum()) == lp.SENTINEL   # read only


@needs_interpreter
def test_bf16_weight_touched_through_its_view():
    torch.manual_seed(0)
    w = torch.randn(64, 96).to(torch.bfloat16)
    w.view(-1).view(torch.int32)[1234] = lp.SENTINEL
    before = w.clone()
    prefetcher = lp.L2Prefetcher(torch.device("cpu"))
    prefetcher.issue(lp.prefetch_words(w))
    prefetcher.join()
    assert int(prefetcher.flags.sum()) == 1 and torch.equal(w, before)


def test_small_flags_buffer_is_refused():
    with pytest.raises(ValueError, match="flags holds 1 entries, the grid has 2"):
        lp.l2_touch(torch.zeros(lp.BLOCK_WORDS + 1, dtype=torch.int32),
                    torch.zeros(1, dtype=torch.int32))
