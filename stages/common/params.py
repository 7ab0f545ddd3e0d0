"""Read `params.yaml` (YAML 1.2, as DVC reads it) and check its sections against their schemas
(stages/common/schemas.py), one clear line per problem."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from stages.common.errors import ConfigError
from stages.common.schemas import SECTIONS

PARAMS_FILE = Path("params.yaml")


T = TypeVar("T")


class Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader, but numbers read as YAML 1.2 (and DVC, through ruamel) read them:
    `1e-3` and `5e-4` are floats, not the strings YAML 1.1 makes of them."""


_FLOAT_12 = re.compile(r"""^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.VERBOSE)
Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:float"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))


# Bounds on what a params file may be, so that reading one takes bounded time and memory
# whatever a hand or a tool wrote into it: params files are a few KB, nested a few levels.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_DEPTH = 32


class RefusedYaml(yaml.MarkedYAMLError):
    """Valid YAML that a params file may not hold: an alias, a duplicate key, deep nesting."""


class StrictYaml12Loader(Yaml12Loader):
    """YAML 1.2 numbers, and none of the hazards of hand-edited YAML: an alias can expand a few KB
    into gigabytes (and DVC, reading the same file, hangs on it), a duplicate key is read as the
    last one here while DVC refuses the file, and deep nesting exhausts the stack."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise RefusedYaml(None, None, f"alias '*{event.anchor}': aliases are not allowed in params files; "
                              "write the value out", event.start_mark)
        self.depth += 1
        if self.depth > MAX_YAML_DEPTH:
            raise RefusedYaml(None, None, f"nested deeper than {MAX_YAML_DEPTH} levels", self.peek_event().start_mark)
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in seen:
                raise RefusedYaml(None, None, f"duplicate key '{key}' (DVC refuses the file); keep one",
                                  key_node.start_mark)
            seen.add(key) if isinstance(key, typing.Hashable) else None
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """YAML text as DVC reads it (numbers per YAML 1.2), refusing aliases, duplicate keys and deep
    nesting: params.yaml, `-S` values, presets, sweep files."""
    return yaml.load(text, Loader=StrictYaml12Loader)


def read_yaml_file(path: Path) -> Any:
    """A params-like file (params.yaml, a preset, a sweep file): any problem is one ConfigError
    naming the file and the line, in bounded time and memory."""
    if not path.is_file():
        raise ConfigError(f"{path} not found")
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise ConfigError(f"{path} is {size} bytes, more than a params file's {MAX_YAML_BYTES}; check what wrote it")
    try:
        return load_yaml(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except RefusedYaml as err:
        raise ConfigError(f"{path}, line {err.problem_mark.line + 1}: {err.problem}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "not valid YAML"
        raise ConfigError(f"{path}{where}: {problem}; fix the YAML there") from None
    except ValueError as err:  # a value no type holds, e.g. an integer of more digits than Python reads
        raise ConfigError(f"{path}: {str(err).splitlines()[0]}; fix the value") from None


def read_params(path: Path = PARAMS_FILE) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path} not found; run from the project root, where params.yaml lives")
    data = read_yaml_file(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a mapping of stage sections (download:, prepare:, ...)")
    return data


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{"train": {"augment": {"flip": true}}} -> {"train.augment.flip": true}: the dotted keys DVC's
    `-S` and our overrides use (an empty mapping is a value of its own)."""
    if isinstance(node, dict) and node:
        return {k: v for key, sub in node.items() for k, v in flatten(sub, f"{prefix}.{key}" if prefix else str(key)).items()}
    return {prefix: node}


def update_params_file(path: Path, updates: dict[str, Any], keep_comments: bool = True) -> None:
    """Set dotted keys in a params file, rewriting only the entries they change: every other line,
    comment and spelling (`null` or nothing, a wrapped flow mapping) stays as the user wrote it.
    Without `keep_comments` (a preset replacing a recipe), a changed entry loses its comments,
    which described the value it had. The file is replaced whole once the new text is ready, so
    it is never half written."""
    from stages.common import dataio

    text = path.read_text()
    for dotted, value in updates.items():
        text = set_in_text(text, dotted, value, keep_comments)
    dataio.write_text(path, text)


def set_in_text(text: str, dotted: str, value: Any, keep_comments: bool = True) -> str:
    """The YAML text with one dotted key set. The entry rewritten is the key's own, or, when the
    key sits inside a flow mapping (`fast_vgg: {widths: [...], ...}`), the nearest enclosing entry
    of a block mapping, whose new value is written in flow style on one line. With
    `keep_comments`, comment lines within the entry and the comment on its first line stay."""
    from ruamel.yaml import YAML

    data = YAML().load(text)
    parts = dotted.split(".")
    chain = [data]
    for part in parts[:-1]:
        chain.append(chain[-1][part])
    current = chain[-1][parts[-1]]
    if _plain(current) == value:
        return text  # nothing to change: the line stays as written
    if isinstance(value, dict) and isinstance(current, dict) and not current.fa.flow_style() \
            and set(map(str, current)) == set(value):
        for key, item in value.items():  # a block mapping keeps its shape and its comments
            text = set_in_text(text, f"{dotted}.{key}", item, keep_comments)
        return text
    depth = len(parts) - 1  # the mapping holding the key being rewritten: the innermost block one
    while depth > 0 and chain[depth].fa.flow_style():
        depth -= 1
    mapping, key = chain[depth], parts[depth]
    if depth == len(parts) - 1:
        new_value = value
    else:  # the enclosing entry, with the key set inside it
        new_value = _plain(mapping[key])
        set_dotted(new_value, ".".join(parts[depth + 1:]), value)
    lines = text.splitlines(keepends=True)
    first, column = mapping.lc.key(key)
    last = _entry_end(lines, mapping, key, first, column)
    comment = _inline_comment(lines[first], mapping.lc.value(key)[1] if first == mapping.lc.value(key)[0] else None)
    entry = f"{' ' * column}{key}: {flow_yaml(new_value)}"
    if comment and keep_comments:
        entry = entry.ljust(comment[0] - 1) + " " + comment[1]
    kept = [line for line in lines[first + 1:last + 1] if keep_comments and line.strip().startswith("#")]
    return "".join([*lines[:first], entry + "\n", *kept, *lines[last + 1:]])


def _plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def _entry_end(lines: list[str], mapping: Any, key: str, first: int, column: int) -> int:
    """The last line of the entry: before the next key of the mapping, or before the first line
    indented no deeper than the key; trailing blank lines and comments belong to what follows."""
    keys = list(mapping)
    following = keys[keys.index(key) + 1:]
    end = mapping.lc.key(following[0])[0] - 1 if following else len(lines) - 1
    if not following:
        for number in range(first + 1, len(lines)):
            stripped = lines[number].strip()
            if stripped and len(lines[number]) - len(lines[number].lstrip()) <= column:
                end = number - 1
                break
    while end > first and (not lines[end].strip() or (lines[end].strip().startswith("#")
                                                      and len(lines[end]) - len(lines[end].lstrip()) <= column)):
        end -= 1
    return end


def _inline_comment(line: str, value_column: int | None) -> tuple[int, str] | None:
    """(column, text) of the comment on an entry's first line, if it has one."""
    start = value_column if value_column is not None else line.index(":") + 1
    found = re.search(r"\s(#.*)$", line[start:].rstrip("\n"))
    return (start + found.start(1), found.group(1)) if found else None


def flow_yaml(value: Any) -> str:
    """A value as YAML 1.2 on one line, read back by load_yaml as the same value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return ".nan"
        return {float("inf"): ".inf", float("-inf"): "-.inf"}.get(value, repr(value))
    if isinstance(value, str):
        try:
            plain = load_yaml(value) == value and value == value.strip() and not re.search(r"[:#{}\[\],&*!|>'\"%@`]", value)
        except (yaml.YAMLError, ValueError):
            plain = False
        return value if plain and value else json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(flow_yaml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{flow_yaml(str(k))}: {flow_yaml(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def set_dotted(params: Any, dotted: str, value: Any) -> None:
    """Set `train.arch.fast_vgg` style keys in a params mapping (plain or ruamel's)."""
    *parents, leaf = dotted.split(".")
    node = params
    for part in parents:
        node = node[part]
    node[leaf] = value


def load_section(name: str, path: Path = PARAMS_FILE) -> Any:
    """The `name` section of params.yaml, checked and converted into its schema (SECTIONS)."""
    params = read_params(path)
    if name not in params:
        raise ConfigError(f"{path} has no '{name}:' section; add it (see docs/pipeline.md)")
    return parse_section(params[name], SECTIONS[name], name)


def parse_section(raw: Any, cls: type[T], prefix: str) -> T:
    if not isinstance(raw, dict):
        raise ConfigError(f"params.yaml: '{prefix}' must be a mapping of keys, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in raw:
        if key not in fields:
            hint = difflib.get_close_matches(str(key), fields, n=1)
            fix = f"did you mean '{prefix}.{hint[0]}'?" if hint else f"allowed keys: {', '.join(fields)}"
            raise ConfigError(f"params.yaml: unknown key '{prefix}.{key}'; {fix}")
    hints = typing.get_type_hints(cls)
    values = {}
    for fname, fld in fields.items():
        key = f"{prefix}.{fname}"
        if fname not in raw and fld.default is not dataclasses.MISSING:  # set by a tool, absent by default
            values[fname] = fld.default
            continue
        if fname not in raw:
            raise ConfigError(f"params.yaml: '{key}' is missing; add it (see docs/pipeline.md)")
        values[fname] = _check_field(raw[fname], hints[fname], fld.metadata, key)
    return cls(**values)


def _check_field(value: Any, tp: Any, meta: typing.Mapping[str, Any], key: str) -> Any:
    value = _convert(value, tp, key)
    if value is None:
        return value
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        allowed = ", ".join(map(str, choices))
        raise ConfigError(f"params.yaml: '{key}' is {value!r}; allowed values: {allowed}")
    low, high = meta.get("min"), meta.get("max")
    if isinstance(value, (int, float)):
        too_low = low is not None and (value <= low if meta.get("min_exclusive") else value < low)
        if too_low or (high is not None and value > high):
            lo = "" if low is None else (f"> {low}" if meta.get("min_exclusive") else f">= {low}")
            hi = "" if high is None else f"<= {high}"
            raise ConfigError(f"params.yaml: '{key}' is {value}; it must be {' and '.join(filter(None, [lo, hi]))}")
    return value


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        concrete = [o for o in options if o is not type(None)]
        if len(concrete) == 1:  # plain Optional: the inner type's own message is the precise one
            return _convert(value, concrete[0], key)
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"params.yaml: '{key}' is {value!r}; it must be {_describe(tp)}")
    if dataclasses.is_dataclass(tp):
        return parse_section(value, tp, key)  # type: ignore[arg-type]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"params.yaml: '{key}' must be a mapping, got {value!r}")
        return {_convert(k, key_tp, key): _convert(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"params.yaml: '{key}' must be a list, got {value!r}")
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (str, bool) and isinstance(value, tp):
        return value
    if tp is Any:
        return value
    raise ConfigError(f"params.yaml: '{key}' is {value!r}; it must be {_describe(tp)}")


def _describe(tp: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_describe(t) for t in typing.get_args(tp))
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def parse_assignments(pairs: typing.Iterable[str], option: str = "--set",
                      example: str = "train.epochs=5") -> dict[str, Any]:
    """['train.epochs=5'] -> {'train.epochs': 5}: the one reader of KEY=VALUE, for the CLI and the
    benchmarks; values are YAML 1.2, as DVC reads them (1e-3 a number, null, lists)."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{option} expects key=value (e.g. {example}), got '{pair}'")
        try:
            overrides[key.strip()] = load_yaml(value) if value.strip() else None
        except (yaml.YAMLError, ValueError) as err:
            problem = getattr(err, "problem", None) or "the value is not valid YAML"
            raise ConfigError(f"{option} {pair}: {problem}; quote it (e.g. key='a: b')") from None
    return overrides


def with_overrides(params: dict[str, Any], overrides: dict[str, Any], values: bool = True) -> dict[str, Any]:
    """The params mapping with dotted overrides set in place; an override whose key it lacks is
    refused, suggesting the nearest one. Without `values`, only the keys are checked."""
    # A key can be a leaf or a whole mapping (train.augment, train.arch.fast_vgg).
    known = {".".join(leaf.split(".")[:i]) for leaf in flatten(params) for i in range(1, leaf.count(".") + 2)}
    for dotted in overrides:
        if dotted not in known:
            hint = difflib.get_close_matches(dotted, sorted(known), n=1)
            raise ConfigError(
                f"override '{dotted}' names no key in params.yaml" + (f"; did you mean '{hint[0]}'?" if hint else "")
            )
    if values:
        for dotted, value in overrides.items():
            set_dotted(params, dotted, value)
    return params


LIST_ITEM = re.compile(r"(?P<key>.+)\.(?P<index>\d+)")


def whole_lists(point: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A sweep point whose keys name items of a list (`train.arch.bn_cnn.widths.0`) as overrides of
    the whole list: DVC's `-S` and the schemas take a key, not an item, and the items a point does
    not draw keep params.yaml's values."""
    out: dict[str, Any] = {}
    keys = flatten(params)
    for dotted, value in point.items():
        item = LIST_ITEM.fullmatch(dotted)
        if item is None or dotted in keys:
            out[dotted] = value
            continue
        key, index = item["key"], int(item["index"])
        if key not in out:
            current = keys.get(key)
            if not isinstance(current, list):
                raise ConfigError(f"sweep key '{dotted}': '{key}' is not a list in params.yaml; "
                                  f"name a list's item (key.0) or a key")
            out[key] = list(current)
        if index >= len(out[key]):
            raise ConfigError(f"sweep key '{dotted}': '{key}' has {len(out[key])} items in params.yaml, "
                              f"so its last is '{key}.{len(out[key]) - 1}'")
        out[key][index] = value
    return out


def read_sweep_file(path: Path) -> dict[str, Any]:
    """A search space file (sweeps/*.yaml): `space:` maps params keys to the values to try, read
    with the same bounds as params.yaml."""
    if not path.is_file():
        raise ConfigError(f"{path} not found; pass a search space file (see sweeps/seed002.yaml)")
    config = read_yaml_file(path) or {}
    if not isinstance(config, dict) or not isinstance(config.get("space"), dict) or not config["space"]:
        raise ConfigError(f"{path} needs a 'space:' mapping of param -> values (see sweeps/seed002.yaml)")
    return config
