"""bench/ordered_test_paths.sh: gpu_check's pytest runs its priority files first. pytest alone
sorts a directory argument together with the files inside it that are also named (stop 19's
H200 call ran test_async_scheduling_gpu.py first, the named priority files later)."""

from __future__ import annotations

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ordered(*args: str) -> list[str]:
    out = subprocess.run(["bash", "-c", 'source bench/ordered_test_paths.sh; '
                          'ordered_test_paths "$@"', "_", *args],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_named_files_first_then_the_rest_of_the_directory_once_each():
    gpu_files = sorted(f"tests/gpu/{f}" for f in os.listdir(os.path.join(ROOT, "tests/gpu"))
                       if f.startswith("test_") and f.endswith(".py"))
    first = ["tests/gpu/test_pdl_gpu.py", "tests/gpu/test_cuda_graphs.py"]
    got = ordered(*first, "tests/gpu/", "-k", "pdl")
    # the named files, then every other test file once in sorted order, then the option
    assert got == first + [f for f in gpu_files if f not in first] + ["-k", "pdl"]
    assert len(gpu_files) > 10


def test_a_file_named_twice_runs_once_and_options_keep_their_place():
    assert ordered("tests/gpu/test_pdl_gpu.py", "-x", "tests/gpu/test_pdl_gpu.py") == \
        ["tests/gpu/test_pdl_gpu.py", "-x"]


def test_gpu_check_passes_its_paths_through_it():
    with open(os.path.join(ROOT, "bench/gpu_check.sh")) as f:
        script = f.read()
    assert 'source "$ROOT/bench/ordered_test_paths.sh"' in script
    assert "-m pytest $(ordered_test_paths \\\n    ${PYTEST_PATHS:-" in script
