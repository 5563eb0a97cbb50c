"""input.dataset that is neither an existing local path nor reachable on the Hub costs one line,
at once: a relative typo (`in/dss`) used to print ~11 lines of hub retry noise over ~25 s."""

import logging
import time

import pytest

from llmbatch.hub_names import looks_like_hub_id
from llmbatch.io import hub_datasets
from llmbatch.io.reader import open_input
from llmbatch.jobs.errors import EXIT_INVALID, InvalidInputError
from llmbatch.jobs.spec import InputSection


@pytest.fixture
def no_load(monkeypatch):
    """load_dataset must not be reached: a missing local path is said without the hub."""
    import datasets

    def refuse(*args, **kwargs):  # pragma: no cover - reached only by a regression
        raise AssertionError("load_dataset was called")

    monkeypatch.setattr(datasets, "load_dataset", refuse)


@pytest.mark.parametrize("name", ["./missing", "/nowhere/dss", "~/no-such-llmbatch-dss",
                                  "a/b/c", "data/dss"])
def test_a_missing_local_path_is_one_line_at_once(tmp_path, monkeypatch, no_load, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()     # 'data/dss': its folder exists, so a local typo
    with pytest.raises(InvalidInputError) as info:
        open_input(InputSection(dataset=name))
    assert info.value.message == (f"input.dataset {name}: no such local directory (a Hugging "
                                  f"Face Hub dataset id is 'name' or 'org/name')")
    assert info.value.exit_code == EXIT_INVALID


@pytest.mark.parametrize("name", ["in.parquet", "data/rows.jsonl"])
def test_a_local_file_is_not_taken_for_a_hub_id(tmp_path, monkeypatch, no_load, name):
    """It went to datasets.load_dataset as a Hub id: retries, then a ConnectionError."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / name).write_text("x")
    with pytest.raises(InvalidInputError) as info:
        open_input(InputSection(dataset=name))
    assert info.value.message == (f"input.dataset {name} is a file; input.dataset takes a "
                                  f"dataset folder or a Hub id: set input.path to read a "
                                  f"Parquet, JSON Lines or CSV file")


@pytest.mark.parametrize("name, hub", [("squad", True), ("org/name", True), ("in/dss", True),
                                       ("./x", False), ("a/b/c", False), ("a\\b", False),
                                       ("org/", False), ("", False)])
def test_what_counts_as_a_hub_id(tmp_path, monkeypatch, name, hub):
    monkeypatch.chdir(tmp_path)
    assert looks_like_hub_id(name) is hub


def test_an_unreachable_hub_fails_fast_and_quietly(tmp_path, monkeypatch, capsys, caplog):
    # No network (the probe says so), nothing cached: the real load_dataset, offline.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    monkeypatch.setattr(hub_datasets, "hub_reachable", lambda: False)
    started = time.monotonic()
    with pytest.raises(InvalidInputError) as info:
        open_input(InputSection(dataset="llmbatch-no-org/no-such-dataset"))
    assert time.monotonic() - started < 10
    assert info.value.message == ("input.dataset llmbatch-no-org/no-such-dataset: not a local "
                                  "directory, and the Hugging Face Hub is offline or unreachable "
                                  "with no cached copy of that dataset")
    out, err = capsys.readouterr()
    assert (out, err) == ("", "")
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_hub_library_warnings_are_silenced_and_restored(monkeypatch, capsys):
    import datasets
    import huggingface_hub.utils.logging as hf_logging

    def noisy(*args, **kwargs):
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
        logging.getLogger("datasets.load").warning("Using the latest cached version")
        raise ValueError("boom\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", noisy)
    monkeypatch.setattr(hub_datasets, "hub_reachable", lambda: True)
    before = hf_logging.get_verbosity()
    with pytest.raises(InvalidInputError) as info:
        open_input(InputSection(dataset="org/name"))
    assert info.value.message == "input.dataset org/name: ValueError: boom"
    assert capsys.readouterr().err == ""
    assert hf_logging.get_verbosity() == before


def test_behind_a_proxy_the_hub_counts_as_reachable_without_a_direct_probe(monkeypatch):
    """Clusters often reach the internet only through HTTPS_PROXY: a direct TCP probe fails
    there while the hub libraries download fine, so a proxy for the Hub's host skips the
    probe (a host in NO_PROXY is probed as before)."""
    import socket

    probed = []

    def no_direct_route(address, timeout=None):
        probed.append(address)
        raise OSError("no route to host")

    monkeypatch.setattr(socket, "create_connection", no_direct_route)
    for var in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    assert hub_datasets.hub_reachable(timeout_s=0.2) is False and len(probed) == 1
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert hub_datasets.hub_reachable(timeout_s=0.2) is True and len(probed) == 1
    monkeypatch.setenv("NO_PROXY", "huggingface.co")
    assert hub_datasets.hub_reachable(timeout_s=0.2) is False and len(probed) == 2
