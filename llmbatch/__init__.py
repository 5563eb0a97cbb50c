"""llmbatch: offline LLM batch inference with its own paged-KV runtime.

Import is cheap and side-effect free: torch and the runtime load only when a job runs.
"""

__version__ = "0.1.0"


def run_job(path_or_dict, **overrides):
    """Run one job (path to a YAML job file, a dict or a JobSpec) and return its JobResult;
    the arguments are llmbatch.api.run_job's (its first one was named spec_or_path here, so
    run_job(path_or_dict=...) as the README spells it failed with a TypeError).

    Thin lazy wrapper so `import llmbatch` does not import torch.
    """
    from llmbatch.api import run_job as _run_job

    return _run_job(path_or_dict, **overrides)


__all__ = ["run_job", "__version__"]
