"""Turn input rows into prompt token ids: plain text or chat messages, batched tokenization.

Row-level problems (a null or empty prompt, messages that do not render, too long for the
context) are returned as error strings for that row, never raised: one bad row must not kill a job.
Job-level problems (a missing column, a template that cannot exist) raise before anything runs.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import pyarrow as pa

from llmbatch.io.arrow_text import is_text
from llmbatch.io.column_values import column_values
from llmbatch.io.content_parts import text_messages
from llmbatch.jobs.errors import InvalidInputError, InvalidJobError


def check_columns(schema: pa.Schema, input_section, per_row: Sequence[str],
                  extra_output: Sequence[str] = ()) -> None:
    """Every column the job names must exist, with a usable type (raises InvalidInputError).
    `extra_output`: the output columns this job adds to OUTPUT_COLUMNS (`logprobs`,
    `prompt_logprobs`, `sample_index`: JobSpec.extra_output_columns); no kept column may have
    an output column's name."""
    names = set(schema.names)
    available = ", ".join(schema.names)

    def need(column: str, key: str) -> None:
        if column not in names:
            raise InvalidInputError(f"{key}: column {column!r} not in input "
                                    f"(columns: {available})")

    if input_section.messages_column is not None:
        need(input_section.messages_column, "input.messages_column")
        kind = schema.field(input_section.messages_column).type
        if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)):
            raise InvalidInputError(f"input.messages_column {input_section.messages_column!r} "
                                    f"has type {kind}, expected a list of {{role, content}}")
        item = kind.value_type
        if not (pa.types.is_struct(item) or pa.types.is_map(item) or pa.types.is_null(item)):
            # list<string>: every row was its own error row ("message 0 is not a mapping").
            raise InvalidInputError(f"input.messages_column {input_section.messages_column!r} "
                                    f"has type {kind}, expected a list of {{role, content}} "
                                    f"(for a column of prompt strings, use input.prompt_column)")
    else:
        need(input_section.prompt_column, "input.prompt_column")
        kind = schema.field(input_section.prompt_column).type
        if pa.types.is_dictionary(kind):   # e.g. a pandas categorical: judge by its values
            kind = kind.value_type
        if not (is_text(kind) or pa.types.is_null(kind)):   # string_view too (Polars)
            # Text stored as bytes (encoded by its writer, or in an unknown encoding).
            why = (" (bytes, not text: store the prompts as UTF-8 strings)"
                   if pa.types.is_binary(kind) or pa.types.is_large_binary(kind) else "")
            raise InvalidInputError(f"input.prompt_column {input_section.prompt_column!r} has "
                                    f"type {kind}, expected string{why}")
    if input_section.id_column is not None:
        need(input_section.id_column, "input.id_column")
    for column in input_section.keep_columns:
        need(column, "input.keep_columns")
    for column in per_row:
        need(column, "sampling.per_row")
    output_columns = set(OUTPUT_COLUMNS) | set(extra_output)
    reserved = set(input_section.keep_columns) & output_columns
    if reserved == {"id"}:
        # An input id kept as a column: the job means it as the row id.
        fix = ("remove it there: input.id_column: id already writes it"
               if input_section.id_column == "id" else
               "set input.id_column: id to use it as the row id")
        raise InvalidJobError(f"input.keep_columns: 'id' clashes with the output's id column; "
                              f"{fix}")
    if reserved:
        raise InvalidJobError(f"input.keep_columns: {sorted(reserved)[0]!r} clashes with an "
                              f"output column; rename it in the input")


# Output columns the runner adds after the kept input columns (the Parquet contract).
OUTPUT_COLUMNS = ("id", "output_text", "output_token_ids", "finish_reason", "error",
                  "num_prompt_tokens", "num_cached_prompt_tokens", "num_output_tokens",
                  "ttft_s", "tpot_s", "latency_s", "spec_accepted_tokens")


def resolve_chat_template(tokenizer, model_section, input_section) -> Optional[str]:
    """Apply `model.chat_template` to the tokenizer; return the template in use (or None)."""
    choice = model_section.chat_template
    if choice == "none":
        template = None
    elif choice == "auto":
        template = getattr(tokenizer, "chat_template", None) or None
        if template is not None:
            check_template_compiles(template, "model.chat_template auto: the tokenizer's "
                                              "chat template")
    else:
        if os.path.isdir(choice):
            raise InvalidJobError(f"model.chat_template: {choice} is a directory, not a Jinja "
                                  f"template file (use auto, none or a path to a Jinja "
                                  f"template)")
        if not os.path.isfile(choice):
            raise InvalidJobError(f"model.chat_template: file not found: {choice} "
                                  f"(use auto, none or a path to a Jinja template)")
        try:
            with open(choice, encoding="utf-8") as f:
                template = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidJobError(f"model.chat_template: cannot read {choice}: {exc}") from None
        check_template_compiles(template, f"model.chat_template {choice}: the template")
        tokenizer.chat_template = template
    if template is None and input_section.messages_column is not None:
        raise InvalidJobError("input.messages_column needs a chat template but the tokenizer has "
                              "none (or model.chat_template is none); set model.chat_template "
                              "to a template file")
    if template is None and model_section.system_prompt is not None:
        raise InvalidJobError("model.system_prompt needs a chat template but the tokenizer has "
                              "none (or model.chat_template is none)")
    if template is None and model_section.chat_template_kwargs:
        raise InvalidJobError("model.chat_template_kwargs needs a chat template but the "
                              "tokenizer has none (or model.chat_template is none)")
    return template


def check_template_compiles(template, what: str) -> None:
    """A template that does not compile fails every row alike: a job error (exit 2 before
    anything is written), not one error row per prompt. Compiled as apply_chat_template
    compiles it (transformers' own sandboxed Jinja environment, cached there)."""
    from jinja2 import TemplateError

    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template as compile_
    except ImportError:  # pragma: no cover - a transformers without the helper
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        compile_ = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string
    # A tokenizer may carry named templates; apply_chat_template uses "default" unless told.
    if isinstance(template, dict):
        template = template.get("default")
    if not isinstance(template, str):
        return
    try:
        compile_(template)
    except TemplateError as exc:
        line = f" at line {exc.lineno}" if getattr(exc, "lineno", None) else ""
        raise InvalidJobError(f"{what} does not compile{line}: {type(exc).__name__}: "
                              f"{getattr(exc, 'message', None) or exc}") from None


class PromptRenderer:
    """Rows -> (prompt token ids or None, error or None), a batch at a time."""

    def __init__(self, tokenizer, model_section, input_section) -> None:
        self.tokenizer = tokenizer
        self.template = resolve_chat_template(tokenizer, model_section, input_section)
        self.system_prompt = model_section.system_prompt
        self.template_kwargs = dict(model_section.chat_template_kwargs)
        # vLLM's continue_final_message: the last message stays open (no end of turn, no new
        # assistant turn), so the model continues it; the two are exclusive in transformers.
        self.continue_final = model_section.continue_final_message
        self.messages_column = input_section.messages_column
        self.prompt_column = input_section.prompt_column
        # Prompts are tokenized whole and over-long ones become error rows (jobs/engine_limits.py), so
        # transformers' "Token indices sequence length is longer than the specified maximum"
        # is noise on stderr: mark it as already shown for this tokenizer (its own once-flag;
        # other warnings still show).
        warned = getattr(tokenizer, "deprecation_warnings", None)
        if isinstance(warned, dict):
            warned["sequence-length-is-longer-than-the-specified-maximum"] = True

    def _apply_template(self, messages: list) -> Any:
        if self.continue_final:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      continue_final_message=True,
                                                      **self.template_kwargs)
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True,
                                                  **self.template_kwargs)

    def _render_messages(self, messages: Any) -> str:
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {role, content}")
        if self.system_prompt is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system_prompt}] + list(messages)
        text = self._apply_template(messages)
        if not isinstance(text, str):
            raise ValueError("the chat template did not return text")
        return text

    def render(self, batch: pa.RecordBatch) -> list[tuple[Optional[list[int]], Optional[str]]]:
        """Tokenize one batch; one (ids, error) pair per row, in order."""
        column = self.messages_column or self.prompt_column
        values, not_utf8 = column_values(batch, column)
        texts: list[Optional[str]] = []
        errors: list[Optional[str]] = []
        for i, value in enumerate(values):
            text, error = None, not_utf8.get(i)
            if error is not None:
                pass
            elif value is None:
                error = f"{column} is null"
            elif self.messages_column is not None:
                try:
                    value = text_messages(value)
                    text = self._render_messages(value)
                except Exception as exc:  # jinja errors, template exceptions, bad structure
                    error = f"messages do not render: {type(exc).__name__}: {exc}"
                if text is not None and all(m["content"] == "" for m in value):
                    text, error = None, f"{column} has only empty contents"
            elif value == "":
                # Empty means "" (or no tokens, below), for plain prompts and messages alike:
                # whitespace is text, sent as is, as vLLM and transformers take it.
                error = f"{column} is empty"
            elif self.template is not None:
                messages = [{"role": "user", "content": value}]
                if self.system_prompt is not None:
                    messages.insert(0, {"role": "system", "content": self.system_prompt})
                try:
                    text = self._apply_template(messages)
                except Exception as exc:
                    error = f"prompt does not render: {type(exc).__name__}: {exc}"
            else:
                text = value
            texts.append(text)
            errors.append(error)
        good = [i for i, t in enumerate(texts) if t is not None]
        results: list[tuple[Optional[list[int]], Optional[str]]] = [(None, e) for e in errors]
        if good:
            # A rendered chat template carries its own BOS/special tokens; a plain prompt gets
            # the tokenizer's usual ones.
            encoded = self.tokenizer([texts[i] for i in good],
                                     add_special_tokens=self.template is None)["input_ids"]
            for i, ids in zip(good, encoded):
                results[i] = (list(ids), None) if ids else (None, f"{column} has no tokens")
        return results

