"""input.path given what belongs elsewhere. A README check pointed input.path at a `datasets`
save_to_disk folder (input.dataset's job): the reader took its dataset_info.json and
state.json as JSON Lines input and refused with "column 'prompt' not in input (columns:
citation, description, features, ...)", which says nothing of the mistake."""

import pytest

from llmbatch.io.reader import open_input
from llmbatch.jobs.errors import InvalidInputError
from llmbatch.jobs.spec import InputSection


@pytest.mark.parametrize("kind", ["dataset", "dataset_dict"])
def test_a_save_to_disk_folder_as_input_path_points_to_input_dataset(tmp_path, kind):
    import datasets

    data = datasets.Dataset.from_dict({"prompt": ["a", "b"]})
    if kind == "dataset_dict":
        data = datasets.DatasetDict({"train": data})
    data.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(InvalidInputError) as info:
        open_input(InputSection(path=str(tmp_path / "saved")))
    assert str(info.value) == (f"input.path {tmp_path / 'saved'} is a `datasets` save_to_disk "
                               f"folder; name it as input.dataset instead")


def test_a_csv_prompt_column_of_digits_is_text(tmp_path):
    # pyarrow infers "123" as int64, and the job was refused: "input.prompt_column 'prompt'
    # has type int64, expected string". A CSV cell is text; the prompt column reads as such.
    (tmp_path / "p.csv").write_text("prompt,n\n123,1\n007,2\n")
    source = open_input(InputSection(path=str(tmp_path / "p.csv")))
    rows = [row for _, batch in source.iter_batches(0, 2, ["prompt", "n"], 8)
            for row in batch.to_pylist()]
    assert rows == [{"prompt": "123", "n": 1}, {"prompt": "007", "n": 2}]
