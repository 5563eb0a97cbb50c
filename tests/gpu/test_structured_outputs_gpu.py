"""Structured outputs on the GPU (bf16, CUDA graphs on for the plain rows, xgrammar's CUDA mask
kernel): every structured output obeys its spec, and the plain rows of the same batch are
those of an engine without structured rows. Unmeasured until a GPU session runs it (written
2026-11-27 without a device)."""

from __future__ import annotations

import json
import re

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("triton")
pytest.importorskip("xgrammar")

from llmbatch.runtime.config import EngineConfig  # noqa: E402
from llmbatch.runtime.engine import Engine  # noqa: E402
from llmbatch.runtime.request import Request  # noqa: E402
from llmbatch.runtime.sampling_params import SamplingParams  # noqa: E402
from tests.runtime.tiny_models import make_model, make_prompts  # noqa: E402

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
          "additionalProperties": False}
SPECS = [{"choice": ["yes", "no"]}, None, {"regex": "[0-9]{3}"}, {"json": SCHEMA}]


def test_structured_rows_obey_and_plain_rows_are_unchanged(tmp_path, tokenizer):
    make_model(tmp_path, arch="llama", num_heads=8, num_kv_heads=2, head_dim=64, hidden=256)
    prompts = make_prompts(16, seed=2)
    specs = [SPECS[i % len(SPECS)] for i in range(len(prompts))]

    def run(with_specs: bool):
        engine = Engine(EngineConfig(model=str(tmp_path), dtype="bfloat16"), tokenizer=tokenizer)
        reqs = [Request(i, p, SamplingParams(max_new_tokens=48, temperature=0.8, seed=i,
                                             structured_outputs=s if with_specs else None))
                for i, (p, s) in enumerate(zip(prompts, specs))
                if with_specs or s is None]
        return {r.request_id: r for r in engine.generate(reqs)}

    got, plain = run(True), run(False)
    for i, spec in enumerate(specs):
        r = got[i]
        if spec is None:
            assert r.output_token_ids == plain[i].output_token_ids
        elif "choice" in spec:
            assert r.output_text in spec["choice"]
        elif "regex" in spec:
            assert re.fullmatch(spec["regex"], r.output_text)
        else:
            assert isinstance(json.loads(r.output_text)["ok"], bool)
