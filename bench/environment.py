"""The record of where a bench run ran: versions, card, date, commit (every results JSON)."""

from __future__ import annotations

import platform
import time


def environment(device: str) -> dict:
    import torch
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "device": device,
           "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
        env["cuda"] = torch.version.cuda
    try:
        import subprocess

        env["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                       text=True, check=False).stdout.strip() or None
    except Exception:
        env["commit"] = None
    return env
