"""Tables in memory are not job values: a job reads its input from files (no torch).

A pipeline that holds its prompts in a pandas DataFrame (or a pyarrow Table, a `datasets`
Dataset) may pass it where a path goes. pydantic takes any iterable for a list key, and a
DataFrame iterates over its column names: input.path=df read 'input.path: prompt does not
exist'. A Table or Dataset for a text key printed its whole repr into the error line. Refused
here, before validation, naming the key and what to do instead.
"""

from __future__ import annotations

from typing import Any

from llmbatch.jobs.errors import InvalidJobError


def _is_table(value: Any) -> bool:
    # By shape, not by import: pandas, polars, pyarrow and datasets are not all installed.
    # column_names: pyarrow Table/RecordBatch, datasets Dataset; columns + shape: DataFrames.
    if isinstance(value, (str, bytes, dict, list, tuple)):
        return False
    return hasattr(value, "column_names") or (hasattr(value, "columns")
                                              and hasattr(value, "shape"))


def refuse_tables(value: Any, where: str = "") -> None:
    """InvalidJobError for the first table in memory found in the job dict `value`."""
    if isinstance(value, dict):
        for key, item in value.items():
            refuse_tables(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            refuse_tables(item, f"{where}[{i}]")
    elif _is_table(value):
        kind = f"{type(value).__module__.split('.')[0]} {type(value).__name__}"
        raise InvalidJobError(f"{where or 'job'}: got a {kind} in memory; llmbatch reads its "
                              f"input from files: write it to Parquet (e.g. "
                              f"df.to_parquet('prompts.parquet')) and name that file")
