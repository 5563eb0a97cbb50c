"""runtime/deferred_tokens.py: the previous step's sampled tokens written over a step's
placeholder input ids on the device (async scheduling). A steady decode step (contiguous rows
reading contiguous sample rows) takes one slice copy and uploads no index list; any other
pattern goes through the index lists. Both write exactly the rows asked for, nothing else."""

from __future__ import annotations

import pytest
import torch

from llmbatch.runtime.deferred_tokens import DeferredTokens


def _no_upload(data, dtype):
    raise AssertionError(f"a contiguous run must not upload an index list, got {data}")


def _upload(data, dtype):
    return torch.tensor(data, dtype=dtype)


PREV = torch.tensor([101, 102, 103, 104, 105, 106], dtype=torch.long)


def _expected(ids, rows, src):
    want = ids.clone()
    for r, s in zip(rows, src):
        want[r] = PREV[s]
    return want


@pytest.mark.parametrize("rows, src", [
    ([0], [0]),                     # batch 1
    ([0, 1, 2, 3], [0, 1, 2, 3]),   # steady decode
    ([2, 3, 4], [1, 2, 3]),         # a prefill row first; the first sampled row finished
])
def test_contiguous_runs_copy_one_slice(rows, src):
    d = DeferredTokens.build(rows, src, PREV, _no_upload)
    assert d.is_slice
    ids = torch.full((8,), -7, dtype=torch.long)
    want = _expected(ids, rows, src)
    d.write_into(ids)
    assert torch.equal(ids, want)


@pytest.mark.parametrize("rows, src", [
    ([0, 1], [1, 0]),               # reordered (a request admitted between)
    ([0, 2], [0, 1]),               # a gap in the rows (a prefill span between decodes)
    ([0, 1, 2], [0, 2, 3]),         # a gap in the sources (a request stopped)
    ([1, 2], [3, 3]),               # not a run at all
])
def test_other_patterns_go_through_the_index_lists(rows, src):
    d = DeferredTokens.build(rows, src, PREV, _upload)
    assert not d.is_slice
    ids = torch.full((8,), -7, dtype=torch.long)
    want = _expected(ids, rows, src)
    d.write_into(ids)
    assert torch.equal(ids, want)


def test_index_lists_are_uploaded_once_as_one_list():
    calls = []

    def counting(data, dtype):
        calls.append(list(data))
        return torch.tensor(data, dtype=dtype)

    DeferredTokens.build([0, 2], [1, 0], PREV, counting)
    assert calls == [[0, 2, 1, 0]]


def test_mismatched_lists_are_refused():
    with pytest.raises(ValueError, match="rows"):
        DeferredTokens.build([0, 1], [0], PREV, _upload)


@pytest.mark.parametrize("src", [[5, 6], [-1, 0], [6], [0, 9]])
def test_sources_outside_the_previous_tokens_are_refused(src):
    """A source row past the step in flight's sampled rows (or negative) is a bookkeeping bug:
    refused on the host, never a short slice that leaves a placeholder id in place."""
    rows = list(range(len(src)))
    with pytest.raises(ValueError, match="sampled"):
        DeferredTokens.build(rows, src, PREV, _upload)
