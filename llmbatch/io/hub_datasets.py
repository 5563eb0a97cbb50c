"""`input.dataset`: a local `datasets` folder or a Hugging Face Hub dataset id, opened as an Arrow
table, with one line on failure (no torch).

A value that is not an existing local path is a Hub id only if it reads as one (the rule of
llmbatch/hub_names.py, shared with model.path); anything else is a mistyped local path, said at
once. A Hub id is loaded with the hub libraries' logging at ERROR and, when the Hub
cannot be reached, in offline mode: without that, huggingface_hub retries 5 times with backoff
and logs each try (11 lines over ~25 s) before the error the user needs.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import urllib.parse
from types import SimpleNamespace

from llmbatch.hub_names import is_missing_local_path
from llmbatch.jobs.errors import InvalidInputError

_TRUE = ("1", "ON", "YES", "TRUE")


def hub_reachable(timeout_s: float = 2.0) -> bool:
    """Whether a TCP connection to the Hub endpoint opens within `timeout_s`. The probe runs in
    a daemon thread: a DNS lookup has no timeout of its own and may hang for many seconds.
    Behind an HTTP(S) proxy (HTTPS_PROXY, ALL_PROXY... for a host not in NO_PROXY) a direct
    connection says nothing: clusters often reach the internet only through one, and the hub
    libraries use it. The Hub counts as reachable there; a real failure then shows as the
    download's own error."""
    import urllib.request

    import huggingface_hub.constants as hf_constants

    url = urllib.parse.urlparse(hf_constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    proxies = urllib.request.getproxies()
    if (proxies.get(url.scheme) or proxies.get("all")) and not urllib.request.proxy_bypass(host):
        return True
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s + 0.5)
    return bool(result and result[0])


def _offline_requested() -> bool:
    # The libraries read these at import time; a job may set them later (in os.environ).
    return any(os.environ.get(var, "").upper() in _TRUE
               for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


@contextlib.contextmanager
def _quiet_hub(offline: bool):
    """Hub library warnings at ERROR and, if `offline`, their offline switches on, both
    restored on exit (the process may go on to load a model from the hub)."""
    import datasets
    import datasets.config as ds_config
    import huggingface_hub.constants as hf_constants
    import huggingface_hub.utils.logging as hf_logging

    saved = (hf_logging.get_verbosity(), datasets.logging.get_verbosity(),
             hf_constants.HF_HUB_OFFLINE, ds_config.HF_HUB_OFFLINE, ds_config.HF_DATASETS_OFFLINE)
    hf_logging.set_verbosity_error()
    datasets.logging.set_verbosity_error()
    if offline:
        hf_constants.HF_HUB_OFFLINE = ds_config.HF_HUB_OFFLINE = True
        ds_config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        hf_logging.set_verbosity(saved[0])
        datasets.logging.set_verbosity(saved[1])
        (hf_constants.HF_HUB_OFFLINE, ds_config.HF_HUB_OFFLINE,
         ds_config.HF_DATASETS_OFFLINE) = saved[2:]


@contextlib.contextmanager
def _no_progress_bars():
    """datasets' own bars ("Generating train split", "Loading dataset shards", "Flattening the
    indices") and the hub's download bars off, each library's setting restored on exit: they
    printed with --progress none, and the process (a pipeline's) may want them later. A
    library's environment variable that forces bars on wins, without its warning."""
    import importlib
    import warnings

    import datasets.utils as ds_utils

    hub_tqdm = importlib.import_module("huggingface_hub.utils.tqdm")
    ds_were_on = not ds_utils.are_progress_bars_disabled()
    hub_states = dict(getattr(hub_tqdm, "progress_bar_states", {}))
    hub_were_on = not hub_tqdm.are_progress_bars_disabled()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds_utils.disable_progress_bars()
        hub_tqdm.disable_progress_bars()
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if ds_were_on:
                ds_utils.enable_progress_bars()
            if hasattr(hub_tqdm, "progress_bar_states"):   # per-group settings, exactly
                hub_tqdm.progress_bar_states.clear()
                hub_tqdm.progress_bar_states.update(hub_states)
            elif hub_were_on:
                hub_tqdm.enable_progress_bars()


def _first_line(exc: Exception) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _single_dataset(name: str, loaded, split: str, split_set: bool) -> str:
    """The description of a saved single Dataset (save_to_disk of a Dataset, not a
    DatasetDict), which holds no splits to choose from: input.split used to be ignored there,
    all rows ran and the log said "name[test]". A split set in the job is refused unless it is
    the one the Dataset was saved as (its `split` attribute); for a Dataset without one,
    "train" (the default, as the README's example spells it) stands for all of it."""
    own = str(loaded.split) if loaded.split is not None else None
    if split_set and split != (own or "train"):
        attribute = f" (its split attribute is {own!r})" if own else ""
        raise InvalidInputError(f"input.split {split!r}: input.dataset {name} is a single saved "
                                f"Dataset without splits{attribute}; remove input.split to read "
                                f"all of it")
    return f"{name}[{own}]" if own else name


def split_applies(section) -> bool:
    """Whether the `input` section's split says which rows are read, for `llmbatch validate`
    (which loads no data): set in the job (checked when the input opens), or the default on a
    dataset that has splits. It printed "split: train" for input.path files and for a saved
    single Dataset, which is read whole (even one saved as its test split)."""
    if "split" in section.model_fields_set:
        return True
    if section.dataset is None:
        return False
    # save_to_disk of a single Dataset: state.json at the top (a DatasetDict has one per split)
    return not os.path.isfile(os.path.join(os.path.expanduser(section.dataset), "state.json"))


def load_dataset_table(name: str, split: str, split_set: bool = True,
                       progress_bars: bool = False):
    """-> (pyarrow.Table, description); InvalidInputError with one line on any failure.
    `split_set`: input.split was given in the job, not left at its default. `progress_bars`:
    let datasets and the hub show theirs (off for --progress none)."""
    # One load at a time in this process: _no_progress_bars and _quiet_hub save and restore
    # process-wide library settings, and two overlapping loads (jobs planned in threads)
    # restored each other's changed state, leaving the hub's bars off (or offline mode on)
    # for good.
    with _LOAD_LOCK:
        if progress_bars:
            return _load_dataset_table(name, split, split_set)
        with _no_progress_bars():
            return _load_dataset_table(name, split, split_set)


_LOAD_LOCK = threading.Lock()


def _is_saved_dict(root: str) -> bool:
    """Whether `root` (a local path or an fsspec URL) is a DatasetDict saved with save_to_disk."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(root)
    return fs.isfile(path.rstrip("/") + "/dataset_dict.json")


def _saved_split(root: str, split: str, name: str):
    """One split of a DatasetDict saved at `root` (a local path or an fsspec URL), loaded
    alone: loading the whole dict failed on any empty split (datasets cannot reload an empty
    saved Dataset: IndexError), the requested one included. An empty split is read from its
    dataset_info.json as a 0-row table of its features."""
    import json

    import datasets
    import fsspec

    fs, path = fsspec.core.url_to_fs(root)
    path = path.rstrip("/")
    with fs.open(f"{path}/dataset_dict.json", "r", encoding="utf-8") as f:
        splits = json.load(f).get("splits", [])
    if split not in splits:
        raise InvalidInputError(f"input.split {split!r} not in dataset {name} "
                                f"(splits: {', '.join(splits)})")
    empty = _empty_saved(fs, f"{path}/{split}")
    if empty is not None:
        return empty[0]
    return datasets.load_from_disk(f"{root.rstrip('/')}/{split}").data.table


def _empty_saved(fs, path: str):
    """(a 0-row table of its features, the split it was saved as) if the Dataset saved at
    `path` has no rows (no data files: load_from_disk fails on it with IndexError), else
    None."""
    import json

    import datasets

    with fs.open(f"{path}/state.json", "r", encoding="utf-8") as f:
        state = json.load(f)
    if state.get("_data_files"):
        return None
    with fs.open(f"{path}/dataset_info.json", "r", encoding="utf-8") as f:
        features = datasets.Features.from_dict(json.load(f)["features"])
    return features.arrow_schema.empty_table(), state.get("_split")


def _saved_single(root: str, name: str, split: str, split_set: bool):
    """(table, description) of a single Dataset saved at `root` (a local path or an fsspec
    URL); an empty one as a 0-row table, which load_from_disk cannot read (for a URL too)."""
    import datasets
    import fsspec

    fs, path = fsspec.core.url_to_fs(root)
    path = path.rstrip("/")
    empty = _empty_saved(fs, path) if fs.isfile(f"{path}/state.json") else None
    if empty is not None:
        table, own = empty
        return table, _single_dataset(name, SimpleNamespace(split=own), split, split_set)
    return _chosen_split(name, datasets.load_from_disk(root), split, split_set, saved=True)


def _load_dataset_table(name: str, split: str, split_set: bool):
    try:
        import datasets
    except ImportError:
        raise InvalidInputError("input.dataset needs the `datasets` package") from None
    local = os.path.expanduser(name)
    url = "://" in name and not name.startswith("hf://")
    try:
        if (url or os.path.isdir(local)) and _is_saved_dict(name if url else local):
            return _saved_split(name if url else local, split, name), f"{name}[{split}]"
        if url:
            # An fsspec URL (file://, memory://, s3:// with its package): a save_to_disk
            # folder, which load_from_disk reads through fsspec (it was "no such local
            # directory").
            try:
                return _saved_single(name, name, split, split_set)
            except InvalidInputError:
                raise
            except Exception as exc:
                raise InvalidInputError(f"input.dataset {name}: not a dataset saved with "
                                        f"save_to_disk ({_first_line(exc)})") from None
    except InvalidInputError:
        raise
    except Exception as exc:
        raise InvalidInputError(f"input.dataset {name}: {_first_line(exc)}") from None
    if is_missing_local_path(name):
        raise InvalidInputError(f"input.dataset {name}: no such local directory (a Hugging Face "
                                f"Hub dataset id is 'name' or 'org/name')")
    if os.path.isfile(local):
        # datasets took the file's name for a Hub id: minutes of retries, then a ConnectionError.
        raise InvalidInputError(f"input.dataset {name} is a file; input.dataset takes a dataset "
                                f"folder or a Hub id: set input.path to read a Parquet, JSON "
                                f"Lines or CSV file")
    try:
        # A save_to_disk folder of a single Dataset (a saved DatasetDict was read above); any
        # other folder goes through load_dataset (local data folders), as does a Hub id
        # (downloaded or cached).
        if os.path.isfile(os.path.join(local, "state.json")):
            return _saved_single(local, name, split, split_set)
        if os.path.exists(local):
            loaded = datasets.load_dataset(local, split=split)
        else:
            offline = _offline_requested() or not hub_reachable()
            with _quiet_hub(offline):
                try:
                    loaded = datasets.load_dataset(name, split=split)
                except OSError:   # ConnectionError, FileNotFoundError: neither Hub nor cache
                    if offline:
                        raise InvalidInputError(
                            f"input.dataset {name}: not a local directory, and the Hugging Face "
                            f"Hub is offline or unreachable with no cached copy of that "
                            f"dataset") from None
                    raise
    except InvalidInputError:
        raise
    except Exception as exc:
        raise InvalidInputError(f"input.dataset {name}: {_first_line(exc)}") from None
    return _chosen_split(name, loaded, split, split_set, saved=False)


def _chosen_split(name: str, loaded, split: str, split_set: bool, saved: bool):
    """(table, description) of the split the job reads of a loaded Dataset or DatasetDict."""
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise InvalidInputError(f"input.split {split!r} not in dataset {name} "
                                    f"(splits: {', '.join(loaded)})")
        loaded, description = loaded[split], f"{name}[{split}]"
    elif saved:
        description = _single_dataset(name, loaded, split, split_set)
    else:   # load_dataset applied the split
        description = f"{name}[{split}]"
    if getattr(loaded, "_indices", None) is not None:
        loaded = loaded.flatten_indices()   # a select/shuffle view: materialize row order
    return loaded.data.table, description
