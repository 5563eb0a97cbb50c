"""Review of f8482b1 (bench/ordered_test_paths.sh): PYTEST_PATHS may hold pytest node ids and
options with separate values, not only files and directories. Deduplicating every argument
dropped a repeated option name (`--deselect A --deselect B` became `--deselect A B`, so B ran
instead of being deselected; `-o a=1 -o b=2` made "b=2" a path), dropped an option's value
already named as a path (`--ignore F -x` became `--ignore -x`), and a directory after a node
id `F::t` added F again, where pytest merges the two and runs F at F's sorted place: the
priority the script exists for was lost."""

from __future__ import annotations

import os

from tests.test_gpu_check_test_order import ROOT, ordered

GPU = sorted(f"tests/gpu/{f}" for f in os.listdir(os.path.join(ROOT, "tests/gpu"))
             if f.startswith("test_") and f.endswith(".py"))
PDL = "tests/gpu/test_pdl_gpu.py"


def test_repeated_options_with_values_pass_through_whole():
    args = ["--deselect", f"{PDL}::a", "--deselect", f"{PDL}::b", "-o", "a=1", "-o", "b=2",
            "-k", "x", "-k", "x"]
    assert ordered("tests/gpu", *args) == GPU + args


def test_an_option_value_that_is_a_named_path_stays_with_its_option():
    assert ordered("tests/gpu", "--ignore", PDL, "-x") == GPU + ["--ignore", PDL, "-x"]
    # a value that is a directory is not expanded into test files
    assert ordered(PDL, "--rootdir", "tests/gpu") == [PDL, "--rootdir", "tests/gpu"]


def test_a_node_id_keeps_its_file_out_of_a_later_directory():
    got = ordered(f"{PDL}::test_x", "tests/gpu")
    assert got == [f"{PDL}::test_x"] + [f for f in GPU if f != PDL]
