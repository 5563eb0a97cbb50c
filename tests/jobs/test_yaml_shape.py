"""YAML that builds more than a job can hold is refused in one line (exit 2): aliases nested
in aliases (a 600-byte file took 27 s and 1.1 GB, one level more all memory), an alias inside
the node it names (the loader's walks never ended), and nesting deeper than PyYAML's
composer recurses (RecursionError, exit 1)."""

import pytest

from llmbatch.cli import main
from llmbatch.jobs import yaml_shape


def _laughs(levels: int) -> str:
    lines = ["model:", "  chat_template_kwargs:", "    defs:", '      l0: &l0 ["lol"]']
    for i in range(1, levels + 1):
        refs = ", ".join([f"*l{i - 1}"] * 10)
        lines.append(f"      l{i}: &l{i} [{refs}]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("text, message", [
    (_laughs(7), "expands to more than 2000000 values (YAML aliases repeated within aliases?)"),
    ("model: &m {path: x, lora: [*m]}\n",
     "a YAML alias refers to a node that contains it (a value that holds itself)"),
    ("model: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
])
def test_oversized_yaml_is_one_line(tmp_path, capsys, text, message):
    job = tmp_path / "job.yaml"
    job.write_text(text)
    assert main(["validate", str(job)]) == 2
    assert capsys.readouterr().err == f"llmbatch: error: job file {job}: {message}\n"


def test_a_set_value_nested_too_deeply_is_one_line(tmp_path, capsys):
    job = tmp_path / "job.yaml"
    job.write_text("model: {path: x}\ninput: {path: in.parquet}\noutput: {path: out}\n")
    assert main(["validate", str(job), "--set",
                 "sampling.stop=" + "[" * 3000 + "]" * 3000]) == 2
    assert capsys.readouterr().err == "llmbatch: error: --set sampling.stop: nested too deeply\n"


def test_shared_values_count_once_per_place_and_a_large_list_passes(monkeypatch):
    shared = list(range(10))
    yaml_shape.check_yaml_shape({"a": [shared] * 3}, "x")      # 1 + 1 + 3 * 11 + ... fine
    monkeypatch.setattr(yaml_shape, "MAX_VALUES", 30)
    with pytest.raises(yaml_shape.InvalidJobError, match="^x: expands to more than 30 "):
        yaml_shape.check_yaml_shape({"a": [shared] * 3}, "x")
    monkeypatch.setattr(yaml_shape, "MAX_VALUES", 2_000_000)
    yaml_shape.check_yaml_shape({"sampling": {"allowed_token_ids": list(range(300_000))}}, "x")
