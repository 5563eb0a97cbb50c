"""The Arrow types a per-row sampling column may have, checked against the input's schema when
the job starts (no torch).

A column no row could use (a temperature stored as text, "0.7") made every row an error row,
and only after the model had run over the whole job. The schema says so up front: one job error
(exit 2) before the model loads. Each key accepts the Arrow types whose Python values
sampling_values.row_value takes; a value of an accepted type that row_value refuses (out of
range, a float max_new_tokens that is not whole) stays that row's error.
"""

from __future__ import annotations

from typing import Callable

import pyarrow as pa

from llmbatch.io.arrow_text import is_text
from llmbatch.io.prompts import check_columns
from llmbatch.jobs.errors import InvalidInputError
from llmbatch.jobs.sampling_values import (BOOL_KEYS, FLOAT_KEYS, INT_KEYS, TEXTS_KEYS,
                                           TOKEN_IDS_KEYS)


def _unwrap(kind: pa.DataType) -> pa.DataType:
    # A dictionary column (a pandas categorical) reads as its values.
    return kind.value_type if pa.types.is_dictionary(kind) else kind


def _number(kind: pa.DataType) -> bool:
    # bool is not an Arrow integer: refused, as the job's sampling section refuses true/false.
    # Decimals read as decimal.Decimal, which row_value refuses: refused here too.
    return pa.types.is_integer(kind) or pa.types.is_floating(kind)


def _list_of(item: Callable[[pa.DataType], bool]) -> Callable[[pa.DataType], bool]:
    def check(kind: pa.DataType) -> bool:
        if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)
                or pa.types.is_fixed_size_list(kind) or pa.types.is_list_view(kind)
                or pa.types.is_large_list_view(kind)):
            return False
        values = _unwrap(kind.value_type)
        # list<null>: a column of empty lists, which pyarrow types so.
        return pa.types.is_null(values) or item(values)
    return check


_INT = (_number, "an integer column (int, or float holding whole numbers)")
_FLOAT = (_number, "a number column (float or int)")
# key -> (accepts the column's Arrow type, what is expected); every key of spec.PER_ROW_KEYS.
ACCEPTED: dict[str, tuple[Callable[[pa.DataType], bool], str]] = {
    **{key: _INT for key in INT_KEYS},
    **{key: _FLOAT for key in FLOAT_KEYS},
    **{key: (pa.types.is_boolean, "a bool column") for key in BOOL_KEYS},
    **{key: (lambda kind: is_text(kind) or _list_of(is_text)(kind),
             "a string column or a list of strings") for key in TEXTS_KEYS},
    "structured_outputs": (is_text, "a string column (the JSON text of a structured_outputs "
                                  "mapping)"),
    **{key: (_list_of(pa.types.is_integer), "a list of integers (list<int64>)")
       for key in TOKEN_IDS_KEYS},
}


def check_per_row_types(schema: pa.Schema, per_row: list[str]) -> None:
    """Raise InvalidInputError (one line) for the first per-row column of a type its key cannot
    take. An all-null column (Arrow type null) fits every key: null means the job's value."""
    for key in per_row:
        kind = _unwrap(schema.field(key).type)
        accepts, expected = ACCEPTED[key]
        if not (pa.types.is_null(kind) or accepts(kind)):
            raise InvalidInputError(f"sampling.per_row: column {key!r} is {kind}; expected "
                                    f"{expected}")


def check_input_columns(schema: pa.Schema, spec) -> None:
    """Every input column the job names exists with a usable type (raises InvalidInputError):
    prompt/messages, id, kept and per-row columns (io/prompts.check_columns), then the per-row
    columns' types."""
    per_row = spec.sampling.per_row
    check_columns(schema, spec.input, per_row, extra_output=spec.extra_output_columns)
    check_per_row_types(schema, per_row)
