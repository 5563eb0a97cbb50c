"""Review of 6a62a8a: the job keys engine.skinny_gemv / engine.pdl (true | false | null = auto)
reach EngineConfig as booleans or None, refuse anything else in one line, and stay out of the
config hash, also through `llmbatch validate`'s printed config reloaded."""

from __future__ import annotations

import copy

import pytest
import yaml

from llmbatch.jobs.errors import InvalidJobError
from llmbatch.jobs.loader import load_job

BASE = {"model": {"path": "m"}, "input": {"path": "x.parquet"}, "output": {"path": "o"}}


def job(**engine):
    d = copy.deepcopy(BASE)
    d["engine"] = engine
    return d


@pytest.mark.parametrize("key", ["skinny_gemv", "pdl"])
@pytest.mark.parametrize("value,shown", [("maybe", "'maybe'"), (2, "2"), ([True], "[True]")])
def test_bad_values_are_one_line_errors(key, value, shown):
    with pytest.raises(InvalidJobError) as info:
        load_job(job(**{key: value}))
    assert str(info.value) == f"engine.{key}: expected a boolean (true/false), got {shown}"
    assert info.value.exit_code == 2


@pytest.mark.parametrize("value", [None, True, False])
def test_values_map_exactly_and_keep_the_hash(value):
    base = load_job(job())
    spec = load_job(job(skinny_gemv=value, pdl=value))
    config = spec.engine_config()
    assert (config.skinny_gemv, config.pdl) == (value, value)
    assert spec.config_hash(1) == base.config_hash(1)
    # validate prints model_dump(mode="json") as YAML; that text loads to the same job
    shown = yaml.safe_load(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    assert (shown["engine"]["skinny_gemv"], shown["engine"]["pdl"]) == (value, value)
    again = load_job(shown)
    assert (again.engine_config().skinny_gemv, again.engine_config().pdl) == (value, value)
    assert again.config_hash(1) == base.config_hash(1)


def test_set_overrides_take_null():
    spec = load_job(job(skinny_gemv=False, pdl=True),
                    sets=["engine.skinny_gemv=null", "engine.pdl=null"])
    assert (spec.engine_config().skinny_gemv, spec.engine_config().pdl) == (None, None)
