"""Config loading: YAML + `--set a.b=value` overrides into nested dataclasses.

Each component owns one dataclass (model.ModelConfig, data_pipeline.TokenizerConfig, ...).
Validation comes from the dataclass itself, stdlib only, so components need not import
this module:
  - the annotation gives the type (``Literal[...]`` gives the allowed values);
  - ``field(metadata={"min": 0, "max": 1})`` gives an inclusive range;
  - ``__post_init__`` may raise ``ValueError`` for cross-field checks.
Every failure is a ConfigError whose message is one line naming the key.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """Invalid configuration; str() is one line naming the offending key."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert `value` to annotation `tp`; raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(str(a) for a in args)
            raise ConfigError(f"config key '{key}': {value!r} is not allowed (allowed: {allowed})")
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise errors[0] if len(errors) == 1 else ConfigError(
            f"config key '{key}': {value!r} matches none of {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return _build(tp, value, key + ".")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_coerce(k, kt, key): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    return value


def _check_range(value: Any, meta: typing.Mapping, key: str) -> None:
    lo, hi = meta.get("min"), meta.get("max")
    if value is None or (lo is None and hi is None):
        return
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
        raise ConfigError(f"config key '{key}': {value!r} is out of range (allowed: {rng})")


def _apply_preset(cls: type, data: dict, prefix: str) -> dict:
    """A dataclass with `preset_values(name) -> dict` lets `preset: NAME` fill its defaults;
    keys given next to the preset win."""
    if "preset" not in data or not hasattr(cls, "preset_values") or not data["preset"]:
        return data
    try:
        base = cls.preset_values(data["preset"])
    except KeyError as e:
        raise ConfigError(f"config key '{prefix}preset': {e.args[0]}") from None
    return {**base, **data}


def _default_dict(f: dataclasses.Field) -> dict:
    """What the field's default instance sets differently from its class's own defaults
    (e.g. {'zero_stage': 3} for a frozen role), so presets and given keys still apply."""
    if f.default_factory is dataclasses.MISSING:
        return {}
    inst = f.default_factory()
    if not dataclasses.is_dataclass(inst):
        return {}
    return _diff(dataclasses.asdict(inst), dataclasses.asdict(type(inst)()))


def _diff(mine: dict, plain: dict) -> dict:
    out = {}
    for k, v in mine.items():
        if isinstance(v, dict) and isinstance(plain.get(k), dict):
            sub = _diff(v, plain[k])
            if sub:
                out[k] = sub
        elif plain.get(k) != v:
            out[k] = v
    return out


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _build(cls: type[T], data: dict, prefix: str = "") -> T:
    data = _apply_preset(cls, data, prefix)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        allowed = ", ".join(sorted(fields))
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}' (allowed: {allowed})")
    kwargs = {}
    for name, value in data.items():
        key = prefix + name
        if dataclasses.is_dataclass(hints[name]) and isinstance(value, dict):
            # A partly given section keeps the parent's defaults for that section
            # (e.g. a frozen role whose default parallel config is ZeRO-3).
            value = _merge(_default_dict(fields[name]), value)
        kwargs[name] = _coerce(value, hints[name], key)
        _check_range(kwargs[name], fields[name].metadata, key)
    # Defaults are validated too, so a dataclass default can never be out of range.
    for name, f in fields.items():
        if name not in kwargs and dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], _default_dict(f), prefix + name + ".")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config '{prefix.rstrip('.') or cls.__name__}': {e}") from None


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{dotted}': '{p}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """'a.b=3' -> ('a.b', 3); the value is read as YAML (numbers, bools, lists)."""
    if "=" not in item:
        raise ConfigError(f"--set '{item}': expected key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(cls: type[T], path: str | Path | None = None,
                overrides: typing.Sequence[str] = (), job: str | None = None) -> T:
    """Build `cls` from an optional YAML file plus `key=value` overrides. A file's top-level
    `job:` key names the command it is for (what `trellis submit` reads); it is checked
    against `job` (the running command) when given, and is not a config key."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            first = str(e).splitlines()[0]
            raise ConfigError(f"config file '{p}': invalid YAML ({first})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{p}': top level must be a mapping")
        made_for = data.pop("job", None)
        if job and made_for and made_for != job:
            raise ConfigError(f"config file '{p}': it is for `trellis {made_for}` (key 'job'), "
                              f"not `trellis {job}`")
    for item in overrides:
        key, value = parse_override(item)
        _set_path(data, key, value)
    return _build(cls, data)


def from_dict(cls: type[T], data: dict) -> T:
    return _build(cls, data)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ---- YAML with each key's doc (`trellis <job> --print-config`) ------------------------------

@functools.lru_cache(maxsize=None)
def _own_docs(cls: type) -> tuple[str, dict[str, str]]:
    """(class docstring, {field: doc}) from `cls`'s own source: a field's doc is the string
    literal right under it. Whitespace is folded into one line. Empty when there is no source."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return "", {}
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef)), None)
    if node is None:
        return "", {}
    docs = {}
    for stmt, nxt in zip(node.body, node.body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return " ".join((ast.get_docstring(node) or "").split()), docs


def field_docs(cls: type) -> dict[str, str]:
    """Each field's doc, inherited ones included (a subclass's own doc wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_docs(klass)[1])
    return docs


def _plain(value: Any) -> Any:
    """Dataclasses, tuples and containers as the dicts and lists YAML writes."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                if f.init}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _doc_lines(cfg: Any, indent: str, width: int) -> typing.Iterator[str]:
    docs = field_docs(type(cfg))
    for f in dataclasses.fields(cfg):
        if not f.init:
            continue
        value = getattr(cfg, f.name)
        section = dataclasses.is_dataclass(value) and not isinstance(value, type)
        doc = docs.get(f.name) or (_own_docs(type(value))[0] if section else "")
        for line in textwrap.wrap(doc, max(40, width - len(indent) - 2)):
            yield f"{indent}# {line}"
        if section and any(g.init for g in dataclasses.fields(value)):
            yield f"{indent}{f.name}:"
            yield from _doc_lines(value, indent + "  ", width)
        else:
            text = yaml.safe_dump({f.name: _plain(value)}, sort_keys=False, width=10_000,
                                  allow_unicode=True)
            yield from (indent + line for line in text.rstrip("\n").splitlines())


def dump_yaml_with_docs(cfg: Any, width: int = 92) -> str:
    """`cfg` as YAML that load_config reads back to an equal config, each key preceded by
    its doc (the string under the dataclass field; for a section without one, its class
    docstring) as a comment, nested sections indented."""
    return "\n".join(_doc_lines(cfg, "", width)) + "\n"
