"""Helpers of the tests that stop a `llmbatch run` subprocess with a signal midway."""

import os
import subprocess
import sys
import time


def committed(out_dir: str) -> int:
    """Parts committed so far (manifest entries)."""
    path = os.path.join(out_dir, "_manifest")
    return len([n for n in os.listdir(path) if n.endswith(".json")]) if os.path.isdir(path) else 0


def signal_after_parts(job_path, out_dir: str, env: dict, signum: int, parts: int,
                       timeout_s: float = 150) -> tuple:
    """Start `llmbatch run job_path`, send `signum` once `parts` parts are committed, and
    return (stderr, exit code, seconds from the signal to the exit)."""
    proc = subprocess.Popen([sys.executable, "-m", "llmbatch.cli", "run", str(job_path),
                             "--progress", "none"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while committed(out_dir) < parts and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before the signal"
    proc.send_signal(signum)
    start = time.monotonic()
    _, err = proc.communicate(timeout=timeout_s)
    return err, proc.returncode, time.monotonic() - start
