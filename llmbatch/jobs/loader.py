"""Load a job: YAML or dict -> overrides -> ${ENV_VAR} expansion -> validated JobSpec (no torch).

Every failure raises InvalidJobError with ONE line that names the key (dotted, with its section)
and what was expected (validation_message.py: unknown keys get a hint for a transformers/vLLM
key, the closest valid key or the valid keys).
"""

from __future__ import annotations

import copy
import datetime
import os
import re
import types
import typing
from typing import Any, Iterable, Optional, Union

import yaml
from pydantic import BaseModel, ValidationError

from llmbatch.jobs.errors import InvalidJobError
from llmbatch.jobs.spec import JobSpec
from llmbatch.jobs.table_values import refuse_tables
from llmbatch.jobs.validation_message import describe_validation_errors
from llmbatch.jobs.yaml_shape import check_yaml_shape

# "$${" (a literal "${"), or "${" and, where it has one of our forms, ${NAME},
# ${NAME:-default} or ${NAME-default}. A "${" without one (unclosed, nested, ${A:=x}) is an
# error: passed through, it became part of a path.
_ENV_RE = re.compile(r"\$\$\{|\$\{(?:([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^${}]*))?\})?")
_ENV_FORMS = ("use ${NAME}, ${NAME:-default} or ${NAME-default} (no $, { or } in the default; "
              "$${ is a literal ${)")

class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key, line: int, first_line: int) -> None:
        super().__init__(f"duplicate key {key!r} at line {line} (first at line {first_line})")


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error: YAML's last-wins
    silently dropped the first `model:` section of a job file."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":   # `<<:` may be overridden
                    continue
                key = self.construct_object(key_node, deep=deep)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise _DuplicateKey(key, line, seen[key])
                    seen[key] = line
                except TypeError:        # an unhashable key: the base class says so
                    continue
        return super().construct_mapping(node, deep=deep)


def read_job_file(path: str) -> dict:
    # Not isfile: a pipe (`llmbatch run <(envsubst < job.yaml)`) is a job file too.
    if not os.path.exists(path):
        raise InvalidJobError(f"job file not found: {path}")
    if os.path.isdir(path):
        raise InvalidJobError(f"job file {path} is a directory; name a YAML job file")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_UniqueKeyLoader)
    except _DuplicateKey as exc:
        raise InvalidJobError(f"job file {path}: {exc}") from None
    except RecursionError:    # PyYAML's composer recurses per nesting level
        raise InvalidJobError(f"job file {path}: nested too deeply") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise InvalidJobError(f"job file {path}: invalid YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidJobError(f"job file {path}: cannot read: {exc}") from None
    check_yaml_shape(data, f"job file {path}")
    if data is None:
        raise InvalidJobError(f"job file {path} is empty")
    if not isinstance(data, dict):
        raise InvalidJobError(f"job file {path}: expected a mapping of sections at the top, "
                              f"got {type(data).__name__}")
    return data


def _has_comment(raw: str) -> bool:
    """Whether YAML would read some '#' of `raw` as a comment: one outside every token (a
    scalar's '#', as in `C#` or a quoted "#", lies inside its token; a comment is no token)."""
    if "#" not in raw:
        return False
    try:
        spans = [(t.start_mark.index, t.end_mark.index) for t in yaml.scan(raw)]
    except yaml.YAMLError:
        return False         # not valid YAML: parse_set keeps the text anyway
    return any(ch == "#" and not any(start <= i < end for start, end in spans)
               for i, ch in enumerate(raw))


def parse_set(item: str) -> tuple[list[str], Any]:
    """`section.key=value` (or `key=value` for top-level keys); value parsed as YAML, except
    that a '#' is never a comment: a value YAML would cut at a '#' is kept as written."""
    if "=" not in item:
        raise InvalidJobError(f"--set {item!r}: expected section.key=value")
    dotted, raw = item.split("=", 1)
    keys = [k.strip() for k in dotted.strip().split(".")]
    if not all(keys) or len(keys) > 2:
        raise InvalidJobError(f"--set {item!r}: expected section.key=value")
    if _has_comment(raw):
        # `model.system_prompt=Rule #1 be brief` gave "Rule", `sampling.stop=###` null: a
        # command-line value has no use for comments, so the text is what the user meant.
        return keys, raw
    annotation = _annotation(keys)
    try:
        value = yaml.load(raw, Loader=_UniqueKeyLoader) if raw.strip() else ""
        check_yaml_shape(value, f"--set {dotted.strip()}")
    except _DuplicateKey as exc:     # '{n: 2, n: 3}' took the last silently, as files did
        raise InvalidJobError(f"--set {item!r}: {str(exc).split(' at line')[0]}") from None
    except RecursionError:
        raise InvalidJobError(f"--set {dotted.strip()}: nested too deeply") from None
    except yaml.YAMLError:
        value = raw          # not valid YAML: keep the text; the schema decides if that is ok
        if "${" in raw and raw.lstrip()[:1] in ("{", "[") and annotation not in _TEXT:
            # '{path: ${MODEL}}' is no YAML; kept as text and expanded, it read "model:
            # expected a mapping, got '{path: /models/x}'".
            raise InvalidJobError(f"--set {item!r}: YAML reads a ${{...}} inside {{ }} or [ ] "
                                  f"only quoted: write \"${{NAME}}\"") from None
        if raw.lstrip()[:1] in ("{", "[") and _takes_mapping_or_list(annotation):
            # 'sampling.stop=[a, b' ran with the one stop string '[a, b'.
            raise InvalidJobError(f"--set {item!r}: the value is not valid YAML (an unclosed "
                                  f"[ or {{?)") from None
    if isinstance(value, dict) and not _takes_mapping(annotation):
        value = raw          # "Be brief: yes" is a sentence, not a mapping: keep the text
    elif isinstance(value, (bool, int, float, datetime.date)) and _is_text(annotation):
        # YAML's 2024-11-27 is a date, yes is true, 0x1F is 31: for a text key (output.path,
        # system_prompt, id_column) the text written is what the user meant.
        value = raw.strip()
    return keys, value


_TEXT = (str, Optional[str])      # the types of keys that only ever take text


def _annotation(keys: list[str]) -> Any:
    """The type of the field `keys` names (None for a key JobSpec does not have)."""
    model: Any = JobSpec
    annotation: Any = None
    for key in keys:
        fields = getattr(model, "model_fields", None)
        if not fields or key not in fields:
            return None
        annotation = model = fields[key].annotation
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _takes_mapping(annotation: Any) -> bool:
    """Whether a field of this type is a section or a mapping-valued key (a pydantic model
    or a dict)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        # Optional[dict[...]] (sampling.logit_bias, structured_outputs): its non-None member.
        return any(_takes_mapping(member) for member in typing.get_args(annotation)
                   if member is not type(None))
    return (isinstance(annotation, type) and issubclass(annotation, BaseModel)) \
        or annotation is dict or typing.get_origin(annotation) is dict


def _takes_mapping_or_list(annotation: Any) -> bool:
    """Whether a field of this type may take a mapping or a list (also when it may take
    text, as sampling.stop: str or a list of str)."""
    members = typing.get_args(annotation) \
        if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (annotation,)
    return _takes_mapping(annotation) or any(
        member is list or typing.get_origin(member) is list for member in members)


def _is_text(annotation: Any) -> bool:
    """Whether a field of this type takes text: str, Optional[str], str or a list of str."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return str in typing.get_args(annotation)
    return annotation is str


def apply_overrides(data: dict, sets: Iterable[str] = (), overrides: Optional[dict] = None) -> dict:
    """Merge keyword overrides ({section: {key: value}} or {top_key: value}) then --set items."""
    data = copy.deepcopy(data)
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key].update(value)
        else:
            data[key] = value
    for item in sets:
        keys, value = parse_set(item)
        if len(keys) == 1 and isinstance(value, dict) and isinstance(data.get(keys[0]), dict):
            data[keys[0]].update(value)   # `parallel={tensor_parallel_size: 2}` sets those keys
            continue
        if len(keys) == 1:
            data[keys[0]] = value
            continue
        section = data.setdefault(keys[0], {})
        if section is None:
            section = data[keys[0]] = {}
        if not isinstance(section, dict):
            raise InvalidJobError(f"--set {item!r}: '{keys[0]}' is not a section")
        section[keys[1]] = value
    return data


def fspath_values(value: Any) -> Any:
    """Every os.PathLike value (a pathlib.Path), in any section or list, as its string: the
    API takes run_job(Path("job.yaml")), so it takes Path values in a job dict too. One pass
    here, before validation, rather than a validator on each path key (input.path and its
    lists, output.path, model.path/tokenizer/chat_template, input.dataset, the draft model)."""
    if isinstance(value, dict):
        return {k: fspath_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [fspath_values(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def expand_env(value: Any, where: str = "") -> Any:
    """Replace ${NAME}, ${NAME:-default}, ${NAME-default} in every string, recursively, as the
    shell does (':-' takes the default when NAME is unset or empty, '-' only when unset); an
    unset NAME without a default, and any other ${...}, is an error."""
    if isinstance(value, dict):
        return {k: expand_env(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, (set, frozenset)):
        # YAML's !!set: a list field takes it in hash order, which changes with PYTHONHASHSEED,
        # so the config hash (and stop, keep_columns order) changed from one run to the next.
        raise InvalidJobError(f"{where or 'job'}: a set (!!set) has no fixed order, so the "
                              f"config hash would change from run to run; use a list")
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$${":
            return "${"
        name, operator, default = match.groups()
        if name is None:
            raise InvalidJobError(f"{where or 'value'}: unsupported ${{...}} form in {value!r}; "
                                  f"{_ENV_FORMS}")
        current = os.environ.get(name)
        if current is None or (current == "" and operator == ":-"):
            if operator is not None:
                return default
            raise InvalidJobError(f"{where}: environment variable {name} is not set")
        return current

    text = _ENV_RE.sub(substitute, value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        # A lone surrogate ("\ud800" in a double-quoted YAML string, or an environment value
        # that was not UTF-8): the tokenizer, the chat template or the Parquet writer failed
        # on it after the model loaded (exit 1).
        raise InvalidJobError(f"{where or 'value'}: {exc.object[exc.start]!a} at position "
                              f"{exc.start} is not valid Unicode text (a lone surrogate)") \
            from None
    if "\0" in text and _names_a_path(where):
        # os.path calls raised "embedded null byte" (exit 1), or the error line carried it.
        raise InvalidJobError(f"{where}: a path cannot hold a NUL character ('\\0' at "
                              f"position {text.index(chr(0))})")
    return text


# Keys whose strings name files or folders (input.path may be a list: 'input.path[0]').
_PATH_KEYS = ("input.path", "input.dataset", "output.path", "model.path", "model.tokenizer",
              "model.lora", "model.chat_template", "speculative.draft_model")


def _names_a_path(where: str) -> bool:
    return where.split("[")[0] in _PATH_KEYS


def validate(data: dict) -> JobSpec:
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise InvalidJobError(describe_validation_errors(exc.errors())) from None


def load_job(source: Union[str, os.PathLike, dict], sets: Iterable[str] = (),
             overrides: Optional[dict] = None) -> JobSpec:
    """Job file path or dict -> validated JobSpec (raises InvalidJobError, one line)."""
    if isinstance(source, dict):
        data = source
    elif isinstance(source, (str, os.PathLike)):
        data = read_job_file(os.fspath(source))
    else:
        raise InvalidJobError(f"a job is a path to a YAML file or a dict, got "
                              f"{type(source).__name__}")
    data = apply_overrides(data, sets, overrides)
    refuse_tables(data)
    data = expand_env(fspath_values(data))
    return validate(data)
