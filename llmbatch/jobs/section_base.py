"""What every section of the job file shares (no torch): unknown keys refused, and numbers that
are numbers (YAML's true/false is not 1/0 here). spec.py and sampling_section.py build on it."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict
from pydantic_core import PydanticCustomError


def _not_bool(error_type: str, expected: str):
    """pydantic takes true for 1 in an int field (shard.index: true ran shard 1): YAML's
    booleans are not numbers here. The error type is pydantic's own, so loader.py names the
    expected type as for any other wrong type."""
    def check(value):
        if isinstance(value, bool):
            raise PydanticCustomError(error_type, expected)
        return value
    return BeforeValidator(check)


Int = Annotated[int, _not_bool("int_type", "Input should be a valid integer")]
Float = Annotated[float, _not_bool("float_type", "Input should be a valid number")]


class Section(BaseModel):
    # extra='forbid' is what makes a typo a loud error instead of a silently ignored key.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
