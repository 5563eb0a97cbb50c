"""The job keys engine.rotary_in_attention (true | false | null = auto) and
engine.gemv_weight_prefetch (off | tile | l2 | both | null = auto), added in stop 19 when both
became auto: they reach EngineConfig as written, refuse anything else in one line (exit 2)
and stay out of the config hash (performance knobs)."""

from __future__ import annotations

import pytest

from llmbatch.jobs.errors import InvalidJobError
from llmbatch.jobs.loader import load_job
from tests.jobs.test_review_auto_gemv_pdl import job


@pytest.mark.parametrize("rotary,prefetch", [(None, None), (True, "tile"), (False, "off"),
                                             (None, "both")])
def test_values_reach_the_engine_and_keep_the_hash(rotary, prefetch):
    spec = load_job(job(rotary_in_attention=rotary, gemv_weight_prefetch=prefetch))
    config = spec.engine_config()
    assert (config.rotary_in_attention, config.gemv_weight_prefetch) == (rotary, prefetch)
    assert spec.config_hash(1) == load_job(job()).config_hash(1)


def test_set_overrides_take_null():
    spec = load_job(job(rotary_in_attention=False, gemv_weight_prefetch="l2"),
                    sets=["engine.rotary_in_attention=null", "engine.gemv_weight_prefetch=null"])
    config = spec.engine_config()
    assert (config.rotary_in_attention, config.gemv_weight_prefetch) == (None, None)


# prefill_graph_max_tokens: 0 (off) or 16..8192; 1..15 too are refused (the buckets start at 16).
@pytest.mark.parametrize("key,value", [("rotary_in_attention", "maybe"),
                                       ("gemv_weight_prefetch", "fast"),
                                       ("gemv_weight_prefetch", True)]
                         + [("prefill_graph_max_tokens", value)
                            for value in (1, 15, 8193, -16, "many", 16.5, True)]
                         + [("graph_logits", value) for value in ("sometimes", 3, None)])
def test_bad_values_are_one_line_errors(key, value):
    with pytest.raises(InvalidJobError) as info:
        load_job(job(**{key: value}))
    message = str(info.value)
    assert message.startswith(f"engine.{key}: ") and "\n" not in message
    assert info.value.exit_code == 2


@pytest.mark.parametrize("rows", [1, 5, 8])
def test_gemv_max_rows_reaches_the_engine_and_keeps_the_hash(rows):
    spec = load_job(job(gemv_max_rows=rows))
    assert spec.engine_config().gemv_max_rows == rows
    assert spec.config_hash(1) == load_job(job()).config_hash(1)


@pytest.mark.parametrize("value", [0, 9, "many", True, 5.5])
def test_gemv_max_rows_out_of_range_is_a_one_line_error(value):
    with pytest.raises(InvalidJobError) as info:
        load_job(job(gemv_max_rows=value))
    message = str(info.value)
    assert message.startswith("engine.gemv_max_rows: ") and "\n" not in message
    assert info.value.exit_code == 2


@pytest.mark.parametrize("tokens", [0, 16, 512])
def test_prefill_graph_max_tokens_reaches_the_engine_and_keeps_the_hash(tokens):
    spec = load_job(job(prefill_graph_max_tokens=tokens))
    assert spec.engine_config().prefill_graph_max_tokens == tokens
    assert spec.config_hash(1) == load_job(job()).config_hash(1)


@pytest.mark.parametrize("on", [True, False])
def test_graph_logits_reaches_the_engine_and_keeps_the_hash(on):
    spec = load_job(job(graph_logits=on))
    assert spec.engine_config().graph_logits is on
    assert spec.config_hash(1) == load_job(job()).config_hash(1)
