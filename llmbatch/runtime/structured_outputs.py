"""Structured outputs (vLLM's): a request's output is forced to match a JSON schema, any JSON
object, a regular expression, one of a list of strings, or an EBNF grammar.

SamplingParams.structured_outputs is a mapping with exactly one key, as vLLM's
StructuredOutputsParams:
    {"json": schema (dict or JSON text)}   no free whitespace, json.dumps' ", " and ": "
                                           (vLLM's disable_any_whitespace; small models
                                           otherwise pad forever with spaces)
    {"json_object": True}                  any JSON object
    {"regex": pattern}
    {"choice": [text, ...]}                exactly one of the texts
    {"grammar": EBNF}                      xgrammar's EBNF (GBNF-like: root ::= ...)

Why xgrammar: compiling a schema to a token-level automaton over a 100k+ byte-level vocabulary
and computing the allowed-token bitmask per step in microseconds is a project of its own;
xgrammar (the default backend of vLLM and SGLang) does both, on CPU, with a Triton kernel to
apply the mask on CUDA. It is optional (`pip install xgrammar`, extra `structured`): without
it, a structured request is that request's error.

How it runs:
  * Engine._admit compiles the spec (StructuredOutputs.matcher; compiled grammars are cached
    per spec) and gives the request a GrammarMatcher (req.grammar); a spec that does not
    compile is the request's error.
  * The sampler masks the row's logits with the matcher's allowed-token bitmask before it
    chooses (mask_logits); Request.append_output_token feeds every appended token to the
    matcher. EOS is allowed only where the grammar may end.
  * The mask depends on every token so far, on the host: like the penalties, such a request
    makes the engine's steps synchronous while it runs and gets no speculative drafts
    (SamplingParams.needs_history).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any, Optional, Sequence

# No torch or xgrammar at import: SamplingParams (and so the job layer, which stays
# torch-free) imports check_spec from here.

KINDS = ("json", "json_object", "regex", "choice", "grammar")
_CACHE_SIZE = 256            # compiled grammars kept (per-row schemas often repeat)


def check_spec(spec: Any) -> None:
    """Raise ValueError (one line) unless `spec` is a valid structured_outputs mapping."""
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise ValueError(f"structured_outputs must be a mapping with exactly one of "
                         f"{', '.join(KINDS)}, got {spec!r}")
    kind, value = next(iter(spec.items()))
    ok = {"json": isinstance(value, (dict, str)) and value != "",
          "json_object": value is True,
          "regex": isinstance(value, str) and value != "",
          "choice": isinstance(value, list) and bool(value)
          and all(isinstance(c, str) and c for c in value),
          "grammar": isinstance(value, str) and value != ""}[kind]
    if not ok:
        want = {"json": "a JSON schema (a mapping or its JSON text)", "json_object": "true",
                "regex": "a non-empty pattern", "choice": "a non-empty list of non-empty texts",
                "grammar": "a non-empty EBNF grammar"}[kind]
        raise ValueError(f"structured_outputs.{kind} must be {want}, got {value!r}")
    if kind == "json" and isinstance(value, dict):
        try:
            json.dumps(value)
        except (TypeError, ValueError) as exc:   # a YAML date as a `default`, say
            raise ValueError(f"structured_outputs.json is not JSON: {exc}") from None


def schema_text(spec: dict) -> dict:
    """`spec` with a {"json": mapping} schema written as JSON text, in the mapping's own
    order: the order of a schema's properties is the order of the output's (vLLM, OpenAI), and
    as text it survives the config hash, which sorts mappings' keys."""
    kind, value = next(iter(spec.items()))
    if kind == "json" and isinstance(value, dict):
        return {"json": json.dumps(value)}
    return spec


def _ebnf_text(text: str) -> str:
    """A double-quoted EBNF literal of `text` (backslash, quote and control characters
    escaped)."""
    out = text.replace("\\", "\\\\").replace('"', '\\"')
    out = out.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return f'"{out}"'


class StructuredOutputs:
    """The engine's grammar compiler (built on the first structured request)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        # vocab_size: the model's (its logits' width), which may exceed the tokenizer's:
        # the extra ids are never allowed.
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=sorted(stop_token_ids))
        self.compiler = xgr.GrammarCompiler(info)
        self._compiled: OrderedDict[str, Any] = OrderedDict()

    def _compile(self, kind: str, value: Any):
        c = self.compiler
        if kind == "json":
            # The schema's own key order: properties are generated in that order.
            schema = value if isinstance(value, str) else json.dumps(value)
            return c.compile_json_schema(schema, any_whitespace=False)
        if kind == "json_object":
            # Any object, nothing else (xgrammar's builtin JSON grammar also takes arrays and
            # free whitespace): vLLM compiles the same schema.
            return c.compile_json_schema('{"type": "object"}', any_whitespace=False)
        if kind == "regex":
            return c.compile_regex(value)
        if kind == "choice":
            return c.compile_grammar("root ::= " + " | ".join(map(_ebnf_text, value)))
        return c.compile_grammar(value)

    def matcher(self, spec: dict):
        """A fresh GrammarMatcher for `spec` (check_spec-valid); ValueError (one line) when
        the spec does not compile (a bad schema, regex or grammar)."""
        # Unsorted: two schemas differing only in key order differ in their output's order.
        key = json.dumps(spec)
        compiled = self._compiled.get(key)
        if compiled is None:
            kind, value = next(iter(spec.items()))
            try:
                compiled = self._compile(kind, value)
            except Exception as exc:   # xgrammar raises RuntimeError / ValueError with text
                reason = " ".join(str(exc).split())[:300]
                raise ValueError(f"structured_outputs.{kind} does not compile: "
                                 f"{reason}") from None
            self._compiled[key] = compiled
            if len(self._compiled) > _CACHE_SIZE:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(key)
        return self._xgr.GrammarMatcher(compiled)


def load_structured_outputs(tokenizer, vocab_size: int, stop_token_ids: Sequence[int]
                            ) -> tuple[Optional[StructuredOutputs], Optional[str]]:
    """(the compiler, None), or (None, why not) when xgrammar is missing or the tokenizer
    cannot be described to it."""
    if tokenizer is None:
        return None, "structured_outputs needs the model's tokenizer"
    try:
        return StructuredOutputs(tokenizer, vocab_size, stop_token_ids), None
    except ImportError:
        return None, ("structured_outputs needs the xgrammar package: pip install xgrammar "
                      "(or llmbatch[structured])")
    except Exception as exc:
        return None, f"structured_outputs: xgrammar cannot read the tokenizer: " \
                     f"{' '.join(str(exc).split())[:300]}"


def mask_logits(logits, rows: Sequence[int], requests: Sequence, output_indices: Sequence[int]):
    """logits (num_rows, V) float32 -> a copy where row rows[i] allows only the tokens
    requests[i]'s grammar accepts next. Its matcher must have every output token so far
    (sync steps): the row samples output token output_indices[i]."""
    import torch
    import xgrammar as xgr

    from llmbatch.runtime.device import host_to_device

    n, vocab = len(rows), logits.shape[1]
    bitmask = xgr.allocate_token_bitmask(n, vocab)             # (n, ceil(V / 32)) int32, CPU
    for i, (req, idx) in enumerate(zip(requests, output_indices)):
        if idx != req.num_grammar_tokens:
            raise RuntimeError(
                f"request {req.request_id!r}: a structured row samples output token {idx} but "
                f"its grammar has {req.num_grammar_tokens}; it needs every token so far (a "
                f"synchronous step without drafts)")
        req.grammar.fill_next_token_bitmask(bitmask, i)
    rows_t = host_to_device(list(rows), torch.int64, logits.device)
    sub = logits.index_select(0, rows_t)
    xgr.apply_token_bitmask_inplace(sub, bitmask.to(logits.device, non_blocking=True))
    return logits.index_copy(0, rows_t, sub)
