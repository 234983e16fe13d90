"""Reading a run configuration: YAML recipe + dotted overrides -> validated sections.

``load_config`` reads a recipe, applies ``key=value`` overrides (values parsed as YAML, so
``train.lr=3e-4`` is a float and ``data.train=[a,b]`` a list), checks every key and value against
the dataclasses, runs each section's ``problems()`` check, and raises one ConfigError listing
*every* problem with its key path, the value given and what is allowed. The phase (``task``)
picks the type of ``model``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from streamtrain.config.sections import ConfigError, RunConfig


def parse_overrides(overrides: list[str]) -> tuple[dict[str, Any], list[str]]:
    """``["train.lr=3e-4", ...]`` -> nested dict, plus problems with malformed items."""
    tree: dict[str, Any] = {}
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(f"override {item!r}: expected key.path=value")
            continue
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text  # not YAML: take it as a plain string
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[parts[-1]] = value
    return tree, problems


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | Path, overrides: list[str], model_types: dict[str, type]) -> RunConfig:
    """Read, override and validate a recipe; ``model_types`` maps task name -> its model dataclass."""
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError([f"cannot read {path}: {exc.strerror}"], source) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {_yaml_problem(exc)}"], source) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"the recipe must be a mapping of sections, got {type(raw).__name__}"], source)
    extra, problems = parse_overrides(overrides)
    return build_config(merge(raw, extra), model_types, source, problems)


def _yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML error in one line: where (1-based line and column) and what."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    context = getattr(error, "context", None)
    return f"{where}{problem}" + (f" ({context})" if context else "")


def build_config(
    raw: dict[str, Any],
    model_types: dict[str, type],
    source: str = "config",
    problems: list[str] | None = None,
) -> RunConfig:
    problems = list(problems or [])
    task = raw.get("task")
    if task not in model_types:
        allowed = sorted(model_types)
        what = "required, one of" if task is None else f"{task!r} is not one of"
        problems.append(f"task: {what} {allowed}")
        model_type: Any = dict
    else:
        model_type = model_types[task]
    hints = dict(typing.get_type_hints(RunConfig))
    hints["model"] = model_type
    values: dict[str, Any] = {}
    for name, hint in hints.items():
        if name in raw:
            values[name] = _convert(raw[name], hint, name, problems)
        elif name == "output_dir":
            problems.append(f"{name}: required")
        elif name == "model" and model_type is not dict:
            values[name] = _convert({}, model_type, name, problems)
    problems += _unknown(raw, hints, "")
    if problems:
        raise ConfigError(problems, source)
    config = RunConfig(**values)
    problems += _section_problems(config, "")
    if problems:
        raise ConfigError(problems, source)
    return config


def _section_problems(obj: Any, prefix: str) -> list[str]:
    found = []
    if dataclasses.is_dataclass(obj):
        if hasattr(obj, "problems"):
            found += [f"{prefix}{problem}" for problem in obj.problems()]
        for item in dataclasses.fields(obj):
            found += _section_problems(getattr(obj, item.name), f"{prefix}{item.name}.")
    return found


def _unknown(raw: dict[str, Any], allowed: dict[str, Any], prefix: str) -> list[str]:
    found = []
    for key in raw:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), list(allowed), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (allowed: {', '.join(allowed)})"
            found.append(f"{prefix}{key}: unknown key{hint}")
    return found


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    if origin is list:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    if hint is type(None):
        return "null"
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


_INVALID = object()


def _convert(value: Any, hint: Any, path: str, problems: list[str]) -> Any:
    """``value`` as type ``hint``; appends a problem and returns _INVALID when it is not."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        others = [arg for arg in args if arg is not type(None)]
        if len(others) == 1:  # Optional[X]: X's own, more precise complaint
            return _convert(value, others[0], path, problems)
        mappings = [arg for arg in others if dataclasses.is_dataclass(arg)]
        if isinstance(value, dict) and len(mappings) == 1:  # a mapping: that section's complaint
            return _convert(value, mappings[0], path, problems)
        lists = [arg for arg in others if typing.get_origin(arg) is list]
        if isinstance(value, list) and len(lists) == 1:  # a list: its items' own complaints
            return _convert(value, lists[0], path, problems)
        for arg in args:  # the first member that takes the value without complaint
            attempt: list[str] = []
            converted = _convert(value, arg, path, attempt)
            if not attempt:
                return converted
        problems.append(f"{path}: {value!r} is not {_describe(hint)}")
        return _INVALID
    if origin is Literal:
        if value in typing.get_args(hint):
            return value
        problems.append(f"{path}: {value!r} is not {_describe(hint)}")
        return _INVALID
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{path}: {value!r} is not {_describe(hint)}")
            return _INVALID
        (item_hint,) = typing.get_args(hint)
        return [_convert(item, item_hint, f"{path}[{i}]", problems) for i, item in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        return _convert_dataclass(value, hint, path, problems)
    if hint is type(None):
        if value is None:
            return None
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is Any:
        return value
    problems.append(f"{path}: {value!r} is not {_describe(hint)}")
    return _INVALID


def _convert_dataclass(value: Any, cls: Any, path: str, problems: list[str]) -> Any:
    if dataclasses.is_dataclass(value):
        return value
    if not isinstance(value, dict):
        problems.append(
            f"{path}: {value!r} is not a mapping of {', '.join(f.name for f in dataclasses.fields(cls))}"
        )
        return _INVALID
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    before = len(problems)
    problems += _unknown(value, {name: None for name in names}, f"{path}.")
    kwargs = {
        name: _convert(value[name], hints[name], f"{path}.{name}", problems)
        for name in names
        if name in value
    }
    if len(problems) > before:
        return _INVALID
    try:
        converted = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        problems.append(f"{path}: {exc}")
        return _INVALID
    if hasattr(converted, "item_problems"):
        item = [f"{path}.{problem}" for problem in converted.item_problems()]
        if item:
            problems += item
            return _INVALID
    return converted
