"""A job's config hash: the settings that decide which rows a job writes and their text.

Every output folder records the hash (manifest entries and part metadata also record the
settings themselves), and a resume or merge under a different hash is refused, naming the keys
that differ (io/config_diff.py). JobSpec.config_hash and JobSpec.hashed_settings call in here.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from typing import TYPE_CHECKING

from llmbatch.io.config_diff import LEFT_OUT_AT, RULES_KEY

if TYPE_CHECKING:
    from llmbatch.jobs.spec import JobSpec

# The version of the rules deciding what a given job file writes (rows, output_text, token ids,
# finish_reason, error rows, row seeds, part boundaries). It is part of every job's config hash,
# so a folder written under other rules refuses to resume instead of mixing rows of both (README:
# a resumed job equals one uninterrupted run). Bump it with ANY change to what a given job file
# writes, greedy jobs included; a change of speed alone keeps it.
#   1: up to ac16046 (not in the hash then; manifest entries record no settings).
#   2: a stop token's text is left out of output_text (ccfd723); a prompt shorter than
#      max_model_len runs, only one of max_model_len tokens or more is an error row (5aad6c9);
#      whitespace-only prompts run (c570366); row seeds are splitmix64 of (sampling.seed, row
#      index), not seed + row index (57cc1a0, which had hashed it for sampled jobs only).
#   3: messages whose content is a list of OpenAI-style text parts run (the parts joined with
#      "\n", io/content_parts.py); they were error rows. Text that is not valid UTF-8 is its
#      row's error; CSV is read without UTF-8 validation, so such a CSV column is text, not
#      binary (a kept one was written as binary).
#   4: min_tokens as vLLM v1: a stop string completed by the min_tokens-th token is ignored
#      (it ended the output, one token of text shorter than EOS could), and EOS is banned
#      below min_tokens with ignore_eos too; error rows the engine refused have null
#      output_text / output_token_ids like every other error row (they were "" and []).
OUTPUT_RULES_VERSION = 4


def hashed_settings(spec: "JobSpec", shard_count: int) -> dict:
    """Everything that changes which rows exist or their text, as job-file keys (JSON
    values): what config_hash hashes, and what each manifest entry records so that a
    refused resume can name the settings that differ (io/config_diff.py).

    Left out on purpose: output.path/mode, shard.index (every shard shares the hash) and
    performance knobs that leave greedy results unchanged (max_num_seqs, token budget,
    memory sizing, cuda_graphs, graph_logits, fused_kernels, async_scheduling, skinny_matmul, skinny_gemv,
    pdl, nf4_triton_gemm, l2_prefetch, gemv_weight_prefetch, rotary_in_attention,
    gemv_max_rows, prefill_graph_max_tokens,
    attention backend, planner window, on_row_error,
    input.batch_size), and the sampling keys of config_diff.LEFT_OUT_AT at their neutral
    value (repetition_penalty 1.0, ...: added later, so every job written before them keeps
    its hash; any other value is hashed).
    Kept: the output rules version, model, tokenizer and template (the template file's
    contents as its sha256, not its name), input selection, sampling,
    dtype/device/quantization/speculation/TP (they change numerics), rows_per_part (part
    boundaries) and the shard count (row ranges).
    """
    model = spec.model.model_dump()
    template = spec.model.chat_template
    if template not in ("auto", "none") and os.path.isfile(template):
        with open(template, "rb") as f:
            model["chat_template"] = "sha256:" + hashlib.sha256(f.read()).hexdigest()
    settings = {
        RULES_KEY: OUTPUT_RULES_VERSION,
        "model": model,
        "input": spec.input.model_dump(exclude={"batch_size"}),
        "output": {"rows_per_part": spec.output.rows_per_part},
        "sampling": spec.sampling.model_dump(),
        "engine": {"device": spec.engine.device, "max_model_len": spec.engine.max_model_len},
        "parallel": spec.parallel.model_dump(),
        "quantization": spec.quantization.model_dump(),
        "speculative": spec.speculative.model_dump(),
        "shard": {"count": shard_count},
    }
    for dotted, neutral in LEFT_OUT_AT.items():
        section, key = dotted.split(".")
        if settings[section].get(key) == neutral:   # floats (1 is 1.0); -0.0 == 0.0 too
            settings[section].pop(key, None)        # model keys' dumps leave them out already
    # As a manifest entry reads it back, so recorded and current settings compare equal.
    return json.loads(json.dumps(settings, default=str))


def settings_hash(settings: dict) -> str:
    """The config hash of hashed_settings: sha256 of the sorted JSON, 16 hex digits."""
    blob = json.dumps(settings, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def earlier_spellings(settings: dict) -> list[dict]:
    """The same job's settings as an earlier llmbatch recorded them, where it hashed another
    spelling of the same meaning: sampling.top_k 0 (off, like -1) was hashed as written until
    6585e66 stored it as -1. Oldest rule first; one entry per rule that applies."""
    out = []
    if settings.get("sampling", {}).get("top_k") == -1:
        alt = copy.deepcopy(settings)
        alt["sampling"]["top_k"] = 0
        out.append(alt)
    return out


def folder_spelling(entries: list[dict], config_hash: str, settings: dict) -> tuple[str, dict]:
    """(hash, settings) a resume writes under: this job's, unless every manifest entry of the
    folder carries the hash of one of earlier_spellings(settings) -- a job that means the same,
    written before that spelling was canonical -- then the folder's, so the resume goes on
    (and its new entries match the old) instead of being refused for a spelling."""
    hashes = {e.get("config_hash") for e in entries}
    if not entries or hashes == {config_hash}:
        return config_hash, settings
    for alt in earlier_spellings(settings):
        if hashes == {settings_hash(alt)}:
            return settings_hash(alt), alt
    return config_hash, settings
