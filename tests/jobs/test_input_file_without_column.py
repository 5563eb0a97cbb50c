"""A multi-file input where one file lacks the prompt (or messages, or id) column the job reads
is refused in one line naming that file and its columns (exit 2, before the model loads), as
`datasets.load_dataset` refuses files whose columns differ. pyarrow reads the missing column as
nulls: every row of that file was an error row 'prompt is null' (exit 3), for a file whose
prompts sit in another column. A kept column missing from a file stays null there (schema
evolution), as before. Fake engine."""

import pandas as pd
import pyarrow.dataset as ds
import yaml

from llmbatch.cli import main


def _files(tmp_path, second: dict) -> None:
    (tmp_path / "inp").mkdir()
    pd.DataFrame({"prompt": ["a b"], "key": ["k0"], "meta": ["m"]}).to_parquet(
        tmp_path / "inp" / "a.parquet")
    pd.DataFrame(second).to_parquet(tmp_path / "inp" / "b.parquet")


def _run(tmp_path, jobkit, tokenizer_dir, **input_keys) -> int:
    job = jobkit.make_job(tokenizer_dir, "inp", "out", input=input_keys)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    return main(["run", "job.yaml", "--progress", "none"])


def test_a_file_without_the_prompt_column(tmp_path, tiny_tokenizer_dir, jobkit,
                                          fake_engine_env, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _files(tmp_path, {"text": ["c d"], "key": ["k1"]})
    assert _run(tmp_path, jobkit, tiny_tokenizer_dir) == 2
    err = capsys.readouterr().err
    assert err == (f"llmbatch: error: input.prompt_column 'prompt' is not in "
                   f"{tmp_path}/inp/b.parquet (its columns: text, key); every input file "
                   f"needs it\n")
    assert not (tmp_path / "out").exists()


def test_a_file_without_the_id_column(tmp_path, tiny_tokenizer_dir, jobkit, fake_engine_env,
                                      monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _files(tmp_path, {"prompt": ["c d"]})
    assert _run(tmp_path, jobkit, tiny_tokenizer_dir, id_column="key") == 2
    assert capsys.readouterr().err == (
        f"llmbatch: error: input.id_column 'key' is not in {tmp_path}/inp/b.parquet (its "
        f"columns: prompt); every input file needs it\n")


def test_a_kept_column_missing_from_a_file_is_null_there(tmp_path, tiny_tokenizer_dir, jobkit,
                                                         fake_engine_env, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _files(tmp_path, {"prompt": ["c d"], "key": ["k1"]})
    assert _run(tmp_path, jobkit, tiny_tokenizer_dir, keep_columns=["meta"]) == 0
    rows = ds.dataset(str(tmp_path / "out")).to_table().to_pylist()
    assert [(r["meta"], r["error"]) for r in rows] == [("m", None), (None, None)]
    capsys.readouterr()
