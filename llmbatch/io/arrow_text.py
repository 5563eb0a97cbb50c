"""Arrow type tests for text, shared by the readers (no torch).

string_view (Arrow 15+ writers, e.g. Polars) is text like string and large_string; pyarrow
before 16 has no is_string_view (pyproject allows pyarrow >= 14), where no column can be one.
"""

from __future__ import annotations

import pyarrow as pa

_is_string_view = getattr(pa.types, "is_string_view", lambda kind: False)
_is_list_view = getattr(pa.types, "is_list_view", lambda kind: False)            # pyarrow 16+
_is_large_list_view = getattr(pa.types, "is_large_list_view", lambda kind: False)


def is_text(kind: pa.DataType) -> bool:
    """string, large_string or string_view."""
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or _is_string_view(kind)


def binary_leaves(kind: pa.DataType) -> pa.DataType:
    """`kind` with every text type inside it (list items, struct fields, map keys and items)
    as large_binary: a cast to it reads text as bytes, with no UTF-8 decoding to fail. Every
    list kind (fixed-size, list views) becomes a large_list and a dictionary its value type:
    left as they were, their text was decoded by to_pylist (UnicodeDecodeError, exit 1)."""
    if is_text(kind):
        return pa.large_binary()
    if pa.types.is_dictionary(kind):
        return binary_leaves(kind.value_type)
    if isinstance(kind, pa.ExtensionType):
        return binary_leaves(kind.storage_type)
    if (pa.types.is_list(kind) or pa.types.is_large_list(kind)
            or pa.types.is_fixed_size_list(kind) or _is_list_view(kind)
            or _is_large_list_view(kind)):
        return pa.large_list(pa.field(kind.value_field.name, binary_leaves(kind.value_type)))
    if pa.types.is_struct(kind):
        return pa.struct([pa.field(f.name, binary_leaves(f.type)) for f in kind])
    if pa.types.is_map(kind):
        return pa.map_(binary_leaves(kind.key_type), binary_leaves(kind.item_type))
    return kind
