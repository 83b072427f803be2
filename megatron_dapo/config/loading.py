"""Load a `RunConfig` from YAML with dotted command-line overrides, and explain bad input.

    cfg = load_config("configs/demo-cpu.yaml", ["algorithm.eps_high=0.3", "training.steps=5"])

YAML is read with `yaml.safe_load`. An override `a.b.c=VALUE` parses VALUE as a YAML scalar or
flow collection (`0.28`, `true`, `null`, `[a, b]`) and sets that key, creating missing mappings.
Every problem is raised as a `ConfigError` whose lines each name where the bad value came from
(`file:line` or the override), the dotted key, the value and what was expected.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pydantic
import yaml

from megatron_dapo.config.schema import RunConfig

ModelT = TypeVar("ModelT", bound=pydantic.BaseModel)


class ConfigError(ValueError):
    """A configuration file or override that cannot be used; the message says why and where."""


@dataclass(frozen=True)
class _Override:
    key: tuple[str, ...]
    value: Any
    text: str


def load_config(
    path: str | Path, overrides: Sequence[str] = (), schema: type[ModelT] = RunConfig
) -> ModelT:
    """Read `path`, apply `overrides` (`dotted.key=value` strings) and validate against `schema`."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config file: {err.strerror}") from err
    data = _parse_yaml(path, text)
    parsed = [_parse_override(o) for o in overrides]
    for override in parsed:
        _set_dotted(data, override)
    try:
        return schema.model_validate(data)
    except pydantic.ValidationError as err:
        locator = _SourceLocator(path, text, parsed)
        lines = [_describe(e, data, locator, schema) for e in err.errors()]
        raise ConfigError(f"{path}: invalid configuration\n  " + "\n  ".join(lines)) from None


def _parse_yaml(path: Path, text: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{where}: not valid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}"
        )
    return data


def _parse_override(text: str) -> _Override:
    key, sep, raw = text.partition("=")
    parts = tuple(key.strip().split("."))
    if not sep or not all(parts):
        raise ConfigError(
            f"override {text!r}: expected dotted.key=value, e.g. algorithm.eps_high=0.28"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {err}") from None
    return _Override(parts, value, text)


def _set_dotted(data: dict[str, Any], override: _Override) -> None:
    node = data
    for depth, part in enumerate(override.key[:-1]):
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            prefix = ".".join(override.key[: depth + 1])
            raise ConfigError(
                f"override {override.text!r}: {prefix} is a {type(child).__name__}, not a section"
            )
        node = child
    node[override.key[-1]] = override.value


class _SourceLocator:
    """Finds where a dotted key was set: an override, or a line of the YAML file."""

    def __init__(self, path: Path, text: str, overrides: Sequence[_Override]) -> None:
        self._path = path
        self._overrides = overrides
        self._root = yaml.compose(text, Loader=yaml.SafeLoader)

    def __call__(self, key: tuple[str | int, ...]) -> str:
        for override in reversed(self._overrides):
            if tuple(key[: len(override.key)]) == override.key:
                return f"override {override.text!r}"
        node, line = self._root, None
        for part in key:
            found = _yaml_child(node, part)
            if found is None:
                break
            line, node = found
        return f"{self._path}:{line}" if line is not None else str(self._path)


def _yaml_child(node: yaml.Node | None, part: str | int) -> tuple[int, yaml.Node] | None:
    """(1-based line where `part` is set, its value node) below a composed YAML node."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if key_node.value == str(part):
                return key_node.start_mark.line + 1, value_node
    if isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
        item = node.value[part]
        return item.start_mark.line + 1, item
    return None


def _describe(
    error: Any, data: dict[str, Any], locator: _SourceLocator, schema: type[pydantic.BaseModel]
) -> str:
    loc = tuple(error["loc"])
    dotted = ".".join(str(p) for p in loc) or "<top level>"
    where = locator(loc)
    if error["type"] == "extra_forbidden":
        hint = _suggest(schema, loc)
        return f"{where}: unknown key {dotted!r}{hint}"
    if error["type"] == "missing":
        return f"{where}: missing required key {dotted!r}"
    message = error["msg"].removeprefix("Value error, ")
    value = _lookup(data, loc)
    if loc and not isinstance(value, dict):
        return f"{where}: {dotted} = {value!r}: {message}"
    return f"{where}: {dotted}: {message}" if loc else f"{where}: {message}"


def _lookup(data: Any, loc: tuple[str | int, ...]) -> Any:
    for part in loc:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _suggest(schema: type[pydantic.BaseModel], loc: tuple[str | int, ...]) -> str:
    """`(did you mean 'eps_high'?; expected one of ...)` for an unknown key at `loc`."""
    model: Any = schema
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if isinstance(part, str) else None
        annotation = field.annotation if field is not None else None
        model = next(
            (
                t
                for t in (annotation, *getattr(annotation, "__args__", ()))
                if isinstance(t, type) and issubclass(t, pydantic.BaseModel)
            ),
            None,
        )
        if model is None:
            return ""
    names = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), names, n=1)
    guess = f"did you mean {close[0]!r}? " if close else ""
    return f" ({guess}expected one of: {', '.join(names)})"
