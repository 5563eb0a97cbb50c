"""Which engine a job gets, and how a model that cannot be loaded is reported.

The runtime engine by default; `engine_factory(EngineConfig) -> engine` from the API, or
LLMBATCH_ENGINE_FACTORY="module:callable" (test-only), replaces it. A model the job names that
is missing or broken is the user's input, so it ends as one line and exit 2 (InvalidJobError),
never as an internal error.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Callable, Optional

from llmbatch.jobs.errors import InternalError, InvalidJobError, JobError
from llmbatch.jobs.spec import JobSpec
from llmbatch.lazy_imports import preload_engine_imports
from llmbatch.one_line import one_line
from llmbatch.runtime.config import EngineConfigError

ENGINE_FACTORY_ENV = "LLMBATCH_ENGINE_FACTORY"     # "module:callable", test-only


def factory_from_env() -> Optional[Callable]:
    spec = os.environ.get(ENGINE_FACTORY_ENV)
    if not spec:
        return None
    module, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise InvalidJobError(f"{ENGINE_FACTORY_ENV}={spec!r}: {exc}") from None


def default_factory(config):
    from llmbatch.runtime.engine import Engine

    return Engine(config)


def model_input_errors() -> tuple:
    """What loading a model raises when the model the job names is missing or broken: a user
    input error, not a bug. OSError: no such directory, a Hub id that cannot be fetched
    (runtime.loader.ModelNotFoundError), no weights; ValueError: an unparsable or unsupported
    config, a checkpoint that does not match it. The libraries that read the files raise types
    of their own for a damaged safetensors file or a config value of the wrong type."""
    errors: list = [OSError, ValueError]
    try:
        from safetensors import SafetensorError
        errors.append(SafetensorError)
    except ImportError:  # pragma: no cover - a dependency of transformers
        pass
    try:
        from huggingface_hub.errors import StrictDataclassError
        errors.append(StrictDataclassError)
    except ImportError:  # older huggingface_hub: configs are not strict dataclasses there
        pass
    return tuple(errors)


# What a tokenizer needs of a Hub repo (runtime/loader.py's patterns less the weights).
_TOKENIZER_FILES = ["*.json", "*.model", "*.tiktoken", "*.txt", "*.jinja"]


def _local_tokenizer(name: str) -> str:
    """`model.tokenizer` as a local folder: a Hub id is fetched (tokenizer files only) from the
    local cache first, then once from the Hub. Left to transformers, an unreachable Hub cost
    a minute of retries logged to stderr, and the failure was blamed on model.path."""
    if os.path.isdir(os.path.expanduser(name)):
        return name
    try:
        from huggingface_hub import snapshot_download
        try:
            return snapshot_download(name, allow_patterns=_TOKENIZER_FILES,
                                     local_files_only=True)
        except Exception:
            return snapshot_download(name, allow_patterns=_TOKENIZER_FILES)
    except Exception as exc:   # offline, unknown repo, gated repo, no huggingface_hub
        raise InvalidJobError(f"model.tokenizer {name}: cannot load the tokenizer: not a local "
                              f"directory and could not be fetched from the Hugging Face Hub "
                              f"({type(exc).__name__}: {one_line(exc, first_line=True)})") from None


def _failed_part(exc: BaseException, spec: JobSpec) -> tuple[str, str, str]:
    """(key, its value, what) of the part whose loading raised `exc`: the draft model
    (runtime/draft_proposer.py), the tokenizer (transformers' tokenization modules) or else
    the model."""
    files = []
    tb = exc.__traceback__
    while tb is not None:
        files.append(os.path.basename(tb.tb_frame.f_code.co_filename))
        tb = tb.tb_next
    if "draft_proposer.py" in files:
        return "speculative.draft_model", spec.speculative.draft_model, "draft model"
    if any("tokenization" in name for name in files):
        if spec.model.tokenizer:
            return "model.tokenizer", spec.model.tokenizer, "tokenizer"
        return "model.path", spec.model.path, "tokenizer"
    return "model.path", spec.model.path, "model"


def make_engine(spec: JobSpec, engine_factory: Optional[Callable] = None):
    """Build the job's engine (loads the model). A model that cannot be loaded raises
    InvalidJobError naming model.path and the first line of the reason. Tensor-parallel ranks
    that do not start, and a custom factory's own error, are JobErrors too (InternalError,
    exit 1), one line: API callers catch JobError. Anything else is a bug and propagates."""
    factory = engine_factory or factory_from_env()
    custom = factory is not None
    preload_engine_imports(runtime_engine=not custom)   # one thread at a time: lazy_imports.py
    try:
        if spec.model.lora and not custom:
            # Checked here too, not only in each rank's loader: a tensor-parallel rank's
            # error would reach the job as the TP start-up failure (exit 1), not this line.
            from llmbatch.runtime.loader import resolve_model_path
            from llmbatch.runtime.lora_merge import read_adapter
            read_adapter(resolve_model_path(spec.model.lora))
        config = spec.engine_config()
        if spec.model.tokenizer:
            config = dataclasses.replace(config, tokenizer=_local_tokenizer(spec.model.tokenizer))
        return (factory or default_factory)(config)
    except JobError:
        raise
    except EngineConfigError as exc:   # a setting the model or device refuses, not the model
        raise InvalidJobError(f"invalid engine settings: {exc}") from None
    except model_input_errors() as exc:
        if getattr(exc, "job_key", None):   # names its own key (runtime/lora_merge.py)
            raise InvalidJobError(f"{exc.job_key}: {' '.join(str(exc).split())}") from None
        key, name, what = _failed_part(exc, spec)
        if what != "model":
            # Its reason is whole: transformers' first line ends "from one of:".
            raise InvalidJobError(f"{key} {name}: cannot load the {what}: "
                                  f"{one_line(exc)}") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not isinstance(exc, (OSError, ValueError)):
            # A library's own type: named, and whole (a strict-config error puts the field
            # on its first line and what is wrong with it on the second).
            first = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        raise InvalidJobError(f"model.path {spec.model.path}: cannot load the model: "
                              f"{first}") from None
    except Exception as exc:
        from llmbatch.runtime.tp_executor import TensorParallelError

        if not (custom or isinstance(exc, TensorParallelError)):
            raise   # a bug in the runtime: the CLI's "internal error" line, LLMBATCH_DEBUG
        text = " ".join(str(exc).split())
        what = "engine_factory failed" if custom else "the engine failed to start"
        raise InternalError(f"{what}: {type(exc).__name__}: {text}") from exc


def usable_engine(engine):
    """`engine`, if it has what the runner uses of it (else InternalError, one line). A custom
    factory that returned None (forgot its return) failed in the runner as "'NoneType' object
    has no attribute 'tokenizer'", outside JobError. Not checked in make_engine: a worker
    rank's engine serves and never returns, and test factories stand in for it there."""
    if not all(hasattr(engine, name) for name in ("tokenizer", "max_model_len", "generate")):
        raise InternalError(f"engine_factory returned {type(engine).__name__}, not an engine "
                            f"(it needs tokenizer, max_model_len and generate)")
    return engine
