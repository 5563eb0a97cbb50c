"""llmbatch: offline LLM batch inference with its own paged-KV runtime.

Import is cheap and side-effect free: torch and the runtime load only when a job runs.
"""

__version__ = "0.1.0"


def run_job(spec_or_path, **overrides):
    """Run one job (path to a YAML job file, or a dict) and return its JobResult.

    Thin lazy wrapper so `import llmbatch` does not import torch.
    """
    from llmbatch.api import run_job as _run_job

    return _run_job(spec_or_path, **overrides)


__all__ = ["run_job", "__version__"]
