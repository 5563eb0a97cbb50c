"""The job file schema (pydantic v2), its config hash, and its mapping onto the runtime (no torch).

Every section forbids unknown keys; `loader.py` turns pydantic's errors into one-line messages
naming the key, its section and the closest valid key. The key names of the issue's contract are
fixed; keys may be added but never renamed.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, Field, field_validator, model_validator

from llmbatch.jobs.config_hash import hashed_settings, settings_hash
from llmbatch.jobs.engine_section import EngineSection
from llmbatch.jobs.sampling_section import SamplingSection
from llmbatch.jobs.sampling_values import row_value
from llmbatch.jobs.section_base import Int
from llmbatch.jobs.section_base import Section as _Section
from llmbatch.runtime.config import EngineConfig
from llmbatch.runtime.sampling_params import SamplingParams
from llmbatch.runtime.seed_mixing import derive_seed


def _named(key: str, expected: str):
    """A path or name key may not be empty (or blank): an empty output.path wrote the parts
    into the current directory, an empty model.path failed as "does not exist" naming nothing."""
    def check(value):
        if isinstance(value, str) and not value.strip():
            raise ValueError(f"{key} is empty; {expected}")
        return value
    return AfterValidator(check)


_MODEL_NAME = "name a model directory or Hub id"

# apply_chat_template's own parameters and the variables its render passes (transformers 4.x
# and 5.x): as a template kwarg each would clash with ours or change what it returns.
_APPLY_CHAT_TEMPLATE_ARGS = frozenset((
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "sanitize_control_tokens", "padding", "truncation",
    "max_length", "return_tensors", "return_dict", "return_assistant_tokens_mask",
    "tokenizer_kwargs"))


_DTYPE_ALIASES = {"half": "float16", "float": "float32", "bf16": "bfloat16", "fp16": "float16",
                  "fp32": "float32"}


class ModelSection(_Section):
    path: Annotated[str, _named("model.path", _MODEL_NAME)]
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    trust_remote_code: bool = False
    chat_template: Annotated[str, _named(   # auto | none | path to a Jinja template file
        "model.chat_template", "use auto, none or a path to a Jinja template")] = "auto"
    system_prompt: Optional[str] = None
    tokenizer: Annotated[Optional[str], _named(      # defaults to path
        "model.tokenizer", "name a tokenizer directory or Hub id, or leave it out to use "
                           "model.path")] = None
    # Extra variables of the chat template for every row (Qwen3's enable_thinking), as vLLM's
    # chat_template_kwargs. Left out of dumps while empty: jobs written before the key keep
    # their config hash (config_hash hashes model_dump()).
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict,
                                                 exclude_if=lambda kwargs: not kwargs)
    # vLLM's LLM.chat(continue_final_message=True): each messages row's last message (an
    # assistant's answer begun) is left open and the model continues it, instead of a new
    # assistant turn after it ("prefill"). Left out of dumps while false (the config hash).
    continue_final_message: bool = Field(default=False, exclude_if=lambda on: not on)
    # A PEFT LoRA adapter folder (or Hub id) merged into the weights at load
    # (runtime/lora_merge.py). Left out of dumps while null (the config hash).
    lora: Optional[str] = Field(default=None, exclude_if=lambda path: path is None)

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_alias(cls, value):
        # vLLM's and torch's short names, stored as the long one (one config hash for both).
        return _DTYPE_ALIASES.get(value, value) if isinstance(value, str) else value

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_variables(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if key in _APPLY_CHAT_TEMPLATE_ARGS:
                raise ValueError(f"'{key}' is an argument of apply_chat_template, not a "
                                 f"template variable")
        return value

    @model_validator(mode="after")
    def _template_needed(self) -> "ModelSection":
        # Caught here, not after the model loads: with chat_template none nothing renders them
        # (io/prompts.py checks the same for a tokenizer that turns out to have no template).
        if self.chat_template == "none":
            for key, unset in (("system_prompt", self.system_prompt is None),
                               ("chat_template_kwargs", not self.chat_template_kwargs)):
                if not unset:
                    raise ValueError(f"model.{key} needs a chat template, but "
                                     f"model.chat_template is none")
        return self


class InputSection(_Section):
    path: Optional[Union[str, list[str]]] = None     # file, glob, directory, fsspec URL (or a list)
    dataset: Annotated[Optional[str], _named(        # datasets: saved dir or a dataset name
        "input.dataset", "name a dataset folder or Hub id")] = None
    split: str = "train"
    format: Literal["auto", "parquet", "csv", "json"] = "auto"
    prompt_column: str = "prompt"
    messages_column: Optional[str] = None
    id_column: Optional[str] = None
    keep_columns: list[str] = Field(default_factory=list)
    # Rows read and tokenized at a time; the bound keeps it an int32 for Arrow's readers (a
    # 20-digit value was an OverflowError, exit 1).
    batch_size: Int = Field(default=1024, ge=1, le=2**31 - 1)

    @model_validator(mode="after")
    def _one_source(self) -> "InputSection":
        if (self.path is None) == (self.dataset is None):
            raise ValueError("input: set exactly one of input.path and input.dataset")
        paths = [self.path] if isinstance(self.path, str) else self.path
        if paths is not None and (not paths or any(not p.strip() for p in paths)):
            raise ValueError("input.path is empty; name a file, glob, directory or URL")
        duplicates = sorted({c for c in self.keep_columns if self.keep_columns.count(c) > 1})
        if duplicates:
            raise ValueError(f"input.keep_columns names {', '.join(duplicates)} more than once")
        return self


class OutputSection(_Section):
    path: Annotated[str, _named("output.path", "name the output directory")]
    rows_per_part: Int = Field(default=10000, ge=1)
    mode: Literal["resume", "overwrite", "error"] = "resume"


class ParallelSection(_Section):
    tensor_parallel_size: Int = Field(default=1, ge=1)


class QuantizationSection(_Section):
    method: Literal["none", "int8", "nf4"] = "none"
    # EngineConfig.quantize_embeddings: the token embedding and LM head too (nf4 only).
    embeddings: bool = False


class SpeculativeSection(_Section):
    method: Literal["none", "ngram", "draft"] = "none"
    num_tokens: Int = Field(default=4, ge=1)
    draft_model: Annotated[Optional[str], _named("speculative.draft_model", _MODEL_NAME)] = None
    # Above this many running requests the engine stops drafting (verification would cost more).
    max_num_seqs: Int = Field(default=16, ge=1)


class ShardSection(_Section):
    # "auto": from SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT, else shard 0 of 1.
    index: Union[Literal["auto"], Int] = "auto"
    count: Union[Literal["auto"], Int] = "auto"


class JobSpec(_Section):
    model: ModelSection
    input: InputSection
    output: OutputSection
    sampling: SamplingSection = Field(default_factory=SamplingSection)
    engine: EngineSection = Field(default_factory=EngineSection)
    parallel: ParallelSection = Field(default_factory=ParallelSection)
    quantization: QuantizationSection = Field(default_factory=QuantizationSection)
    speculative: SpeculativeSection = Field(default_factory=SpeculativeSection)
    shard: ShardSection = Field(default_factory=ShardSection)
    on_row_error: Literal["record", "fail"] = "record"

    @model_validator(mode="after")
    def _messages_need_a_template(self) -> "JobSpec":
        if self.input.messages_column is not None and self.model.chat_template == "none":
            raise ValueError("input.messages_column needs a chat template, but "
                             "model.chat_template is none")
        if self.model.continue_final_message and self.input.messages_column is None:
            # A plain prompt is one user message: continuing it would write the user's text.
            raise ValueError("model.continue_final_message continues each row's last message "
                             "and needs input.messages_column (rows of messages ending in the "
                             "assistant's begun answer)")
        return self

    # -- runtime mapping -----------------------------------------------------------------
    def engine_config(self) -> EngineConfig:
        """The runtime's EngineConfig; raises ValueError with the runtime's own message."""
        e = self.engine
        kwargs: dict[str, Any] = dict(
            model=self.model.path, tokenizer=self.model.tokenizer, dtype=self.model.dtype,
            lora=self.model.lora,
            trust_remote_code=self.model.trust_remote_code, device=e.device,
            max_model_len=e.max_model_len or None,      # 0: the model's own, like null
            block_size=e.block_size, max_num_seqs=e.max_num_seqs,
            max_num_batched_tokens=e.max_num_batched_tokens,
            gpu_memory_utilization=e.gpu_memory_utilization, kv_cache_blocks=e.kv_cache_blocks,
            # The window counts input rows; the planner sees sampling.n requests per row, so
            # a row's samples are never split across windows (a split sample recomputes the
            # prompt: leaders are set within a window).
            prefix_caching=e.prefix_caching, ordering=e.ordering,
            planner_window=e.planner_window * self.sampling.n,
            attention_backend=e.attention_backend, cuda_graphs=e.cuda_graphs,
            graph_logits=e.graph_logits,
            fused_kernels=e.fused_kernels, async_scheduling=e.async_scheduling,
            skinny_matmul=e.skinny_matmul, skinny_gemv=e.skinny_gemv, pdl=e.pdl,
            nf4_triton_gemm=e.nf4_triton_gemm,
            l2_prefetch=e.l2_prefetch, gemv_weight_prefetch=e.gemv_weight_prefetch,
            rotary_in_attention=e.rotary_in_attention, gemv_max_rows=e.gemv_max_rows,
            prefill_graph_max_tokens=e.prefill_graph_max_tokens,
            tensor_parallel_size=self.parallel.tensor_parallel_size,
            quantization=self.quantization.method,
            quantize_embeddings=self.quantization.embeddings,
            speculative_method=self.speculative.method,
            num_speculative_tokens=self.speculative.num_tokens,
            draft_model=self.speculative.draft_model,
            speculative_max_num_seqs=self.speculative.max_num_seqs, seed=self.sampling.seed)
        if e.cpu_kv_cache_bytes is not None:
            kwargs["cpu_kv_cache_bytes"] = e.cpu_kv_cache_bytes
        return EngineConfig(**kwargs)

    @property
    def wants_logprobs(self) -> bool:
        """Output gets a `logprobs` column: asked for job-wide or per row."""
        return self.sampling.logprobs is not None or "logprobs" in self.sampling.per_row

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Output gets a `prompt_logprobs` column: asked for job-wide or per row."""
        s = self.sampling
        return s.prompt_logprobs is not None or "prompt_logprobs" in s.per_row

    @property
    def extra_output_columns(self) -> tuple[str, ...]:
        """Output columns beyond io/prompts.OUTPUT_COLUMNS that this job writes."""
        return tuple(name for name, on in (("sample_index", self.sampling.n > 1),
                                           ("logprobs", self.wants_logprobs),
                                           ("prompt_logprobs", self.wants_prompt_logprobs))
                     if on)

    def sampling_params(self, row_overrides: Optional[dict] = None,
                        row_seed_offset: int = 0) -> SamplingParams:
        """SamplingParams for one row: the job's values, then the row's non-null overrides.

        Each row's seed is derive_seed(sampling.seed, global row index) unless the row brings
        its own seed (used as is): rows differ from each other, two job seeds give unrelated
        samples, and a row's seed never depends on sharding, ordering, batch size or resume.
        """
        s = self.sampling
        values = dict(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                      top_k=s.top_k, seed=derive_seed(s.seed, row_seed_offset), stop=list(s.stop),
                      stop_token_ids=list(s.stop_token_ids), ignore_eos=s.ignore_eos,
                      logprobs=s.logprobs, repetition_penalty=s.repetition_penalty,
                      presence_penalty=s.presence_penalty,
                      frequency_penalty=s.frequency_penalty, min_p=s.min_p,
                      min_tokens=s.min_tokens, prompt_logprobs=s.prompt_logprobs,
                      include_stop_str_in_output=s.include_stop_str_in_output,
                      skip_special_tokens=s.skip_special_tokens,
                      allowed_token_ids=(list(s.allowed_token_ids)
                                         if s.allowed_token_ids is not None else None),
                      logit_bias=dict(s.logit_bias) if s.logit_bias else None,
                      structured_outputs=s.structured_outputs,
                      bad_words=list(s.bad_words) if s.bad_words else None)
        for key, value in (row_overrides or {}).items():
            if value is not None:
                values[key] = row_value(key, value)
        return SamplingParams(**values)

    # -- hashing (jobs/config_hash.py) ---------------------------------------------------
    def hashed_settings(self, shard_count: int) -> dict:
        """What config_hash hashes, as job-file keys; see config_hash.hashed_settings."""
        return hashed_settings(self, shard_count)

    def config_hash(self, shard_count: int) -> str:
        return settings_hash(self.hashed_settings(shard_count))
