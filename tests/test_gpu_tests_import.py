"""tests/gpu/ skips itself without CUDA, so on this machine nothing executes its imports: a name
renamed or removed in llmbatch, bench or tests/runtime (the GPU files import the CPU tests'
case builders) would only fail on a GPU, costing scarce device time. Here every
`from <ours> import <names>` of every tests/gpu file (module level or inside a function) is
resolved on the CPU: the module imports and has each name."""

from __future__ import annotations

import ast
import importlib
import pathlib

import pytest

GPU_DIR = pathlib.Path(__file__).parent / "gpu"
OURS = ("llmbatch", "tests", "bench")


def _our_imports():
    """(file, module, name) for each name imported from our packages by a tests/gpu file."""
    found = []
    for path in sorted(GPU_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                    and node.module.split(".")[0] in OURS:
                found += [(path.name, node.module, a.name) for a in node.names]
            elif isinstance(node, ast.Import):
                found += [(path.name, a.name, None) for a in node.names
                          if a.name.split(".")[0] in OURS]
    return found


IMPORTS = _our_imports()


def test_the_gpu_files_import_something_of_ours():
    # The walk itself works (a parse that found nothing would make the test below vacuous).
    assert len(IMPORTS) > 50
    assert ("test_rotary_decode_attention_gpu.py", "tests.runtime.test_rotary_decode_attention",
            "run_two_ways") in IMPORTS


def _top_level_names(path: pathlib.Path) -> set:
    """Names a module defines or imports at its top level (for tests/gpu modules, which skip
    themselves when imported without CUDA)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                names |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


@pytest.mark.parametrize("module", sorted({m for _, m, _ in IMPORTS}))
def test_every_name_a_gpu_test_imports_exists(module):
    wanted = {(f, name) for f, m, name in IMPORTS if m == module and name is not None}
    if module.startswith("tests.gpu."):
        path = GPU_DIR / (module.rsplit(".", 1)[1] + ".py")
        assert path.is_file(), f"{module} does not exist"
        have = _top_level_names(path)
        missing = sorted(f"{f}: {name}" for f, name in wanted if name not in have)
    else:
        pytest.importorskip("triton")
        mod = importlib.import_module(module)
        missing = sorted(f"{f}: {name}" for f, name in wanted
                         if not hasattr(mod, name) and not _is_submodule(module, name))
    assert not missing, f"{module} lacks names tests/gpu imports: {missing}"


def _is_submodule(module: str, name: str) -> bool:
    """`from package import submodule` names a module, not an attribute (yet)."""
    try:
        importlib.import_module(f"{module}.{name}")
    except ImportError:
        return False
    return True
