"""The heavy imports a job makes lazily (transformers names, torch, the runtime, datasets),
done once per process under one lock before the job starts.

Why: `import llmbatch` stays cheap, so these happen inside the first run_job. transformers'
top-level module resolves its names lazily (_LazyModule.__getattr__ imports the submodule on
first access), and two threads resolving names at once, as two run_job calls started together
in a fresh process do, failed one of them with "cannot import name 'AutoTokenizer' from
'transformers'" (Python's import lock guards a module, not that resolution; torch's own import
is not safe to race either). Once resolved, a name is a plain attribute of the module, so the
import sites (runtime/engine.py, runtime/loader.py, io/prompts.py, jobs/fake_engine.py,
io/hub_datasets.py) stay as they are and find everything in place.
"""

from __future__ import annotations

import importlib
import threading
from typing import Iterable, Optional

# (module, name in it or None): what every job imports (the tokenizer side: prompt rendering,
# the fake engine's tokenizer class), and what the runtime engine adds (torch, its tokenizer
# and config loading, the engine and model modules). A custom engine_factory gets the first
# list only: the fake engine must not pay for torch.
TOKENIZER = (("transformers", "PreTrainedTokenizerFast"),
             ("transformers.utils.chat_template_utils", None))
RUNTIME = (("torch", None),
           ("transformers", "AutoTokenizer"), ("transformers", "AutoConfig"),
           ("transformers", "GenerationConfig"),
           ("llmbatch.runtime.engine", None), ("llmbatch.runtime.model_runner", None),
           ("llmbatch.runtime.models.registry", None))
DATASETS = (("datasets", None),)

_LOCK = threading.Lock()
_done: set = set()


def preload(items: Iterable[tuple[str, Optional[str]]]) -> None:
    """Import each module and resolve each name once per process, one thread at a time.

    Best effort: a package that cannot be imported is left to the site that imports it, which
    reports it in its own words (hub_datasets: 'input.dataset needs the `datasets` package')."""
    todo = [item for item in items if item not in _done]
    if not todo:                        # the usual case after the first job: no lock taken
        return
    with _LOCK:
        for module_name, attr in todo:
            if (module_name, attr) in _done:
                continue
            try:
                module = importlib.import_module(module_name)
                if attr is not None:
                    getattr(module, attr)
            except (ImportError, AttributeError):
                continue
            _done.add((module_name, attr))


def preload_engine_imports(runtime_engine: bool) -> None:
    """Before an engine is built (jobs/engine_factory.make_engine): TOKENIZER, plus RUNTIME for
    llmbatch's own engine. Not earlier: a job refused while planning (a missing input) is
    refused without the seconds torch takes to import."""
    preload(TOKENIZER + (RUNTIME if runtime_engine else ()))
