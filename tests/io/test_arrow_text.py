"""io/arrow_text.py: which Arrow types are text, and text leaves cast to bytes."""

import importlib

import pyarrow as pa

from llmbatch.io import arrow_text


def test_text_types():
    assert all(arrow_text.is_text(t) for t in (pa.string(), pa.large_string(), pa.string_view()))
    assert not any(arrow_text.is_text(t) for t in (pa.binary(), pa.int64(), pa.list_(pa.string())))


def test_without_is_string_view_as_in_pyarrow_before_16(monkeypatch):
    """pyproject allows pyarrow >= 14; the input digest called pa.types.is_string_view on every
    non-string column read (AttributeError, 'engine failed') there."""
    monkeypatch.delattr(pa.types, "is_string_view")
    old = importlib.reload(arrow_text)
    try:
        assert old.is_text(pa.string()) and not old.is_text(pa.int64())
    finally:
        monkeypatch.undo()
        importlib.reload(arrow_text)
    assert arrow_text.is_text(pa.string_view())


def test_binary_leaves_reads_text_inside_lists_structs_and_maps_as_bytes():
    kind = pa.list_(pa.struct([("role", pa.string()),
                               ("tags", pa.map_(pa.string(), pa.large_string())),
                               ("n", pa.int32())]))
    bad = pa.array([b"caf\xe9"], pa.binary()).view(pa.string())
    value = pa.array([[{"role": "user", "tags": [("k", "v")], "n": 1}]], kind)
    assert value.cast(arrow_text.binary_leaves(kind)).to_pylist() == [
        [{"role": b"user", "tags": [(b"k", b"v")], "n": 1}]]
    assert bad.cast(arrow_text.binary_leaves(bad.type)).to_pylist() == [b"caf\xe9"]
