"""Typed option fields: read a dataclass's annotations once, check and convert values.

Supported field types: ``int``, ``float``, ``bool``, ``str``, ``tuple[X, ...]``
of those (a list option), each optionally ``| None``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Any, Callable

from sslbench_jax import _parse

_KINDS = {int: "int", float: "float", bool: "bool", str: "str"}


@dataclasses.dataclass(frozen=True)
class FieldSpec:
  """One option: name, item kind, list-ness, default and rules."""
  name: str
  kind: str            # int | float | bool | str (of the value or of every item)
  is_list: bool
  optional: bool       # None allowed (a derived default)
  default: Any
  help: str
  choices: tuple[Any, ...] | None
  check: tuple[Callable[[Any], bool], str] | None
  default_text: str | None

  def type_text(self) -> str:
    t = {"int": "integer", "float": "number", "bool": "true/false", "str": "string"}[self.kind]
    return f"a non-empty list of {t}s" if self.is_list else f"{'an' if t[0] in 'ai' else 'a'} {t}"


def _parse_annotation(cls, name, annotation) -> tuple[str, bool, bool]:
  optional = False
  origin = typing.get_origin(annotation)
  if origin in (typing.Union, types.UnionType):
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(args) != 1:
      raise TypeError(f"{cls.__name__}.{name}: unsupported type {annotation}")
    optional, annotation = True, args[0]
    origin = typing.get_origin(annotation)
  if origin is tuple:
    args = typing.get_args(annotation)
    if len(args) != 2 or args[1] is not Ellipsis or args[0] not in _KINDS:
      raise TypeError(f"{cls.__name__}.{name}: unsupported type {annotation}")
    return _KINDS[args[0]], True, optional
  if annotation not in _KINDS:
    raise TypeError(f"{cls.__name__}.{name}: unsupported type {annotation}")
  return _KINDS[annotation], False, optional


@functools.lru_cache(maxsize=None)
def specs(cls: type) -> tuple[FieldSpec, ...]:
  """The option fields of an options dataclass, in declaration order."""
  hints = typing.get_type_hints(cls)
  out = []
  for f in dataclasses.fields(cls):
    kind, is_list, optional = _parse_annotation(cls, f.name, hints[f.name])
    md = f.metadata
    out.append(FieldSpec(f.name, kind, is_list, optional, f.default,
                         md.get("help", ""), md.get("choices"), md.get("check"),
                         md.get("default_text")))
  return tuple(out)


def _item(spec: FieldSpec, value: Any, where: str) -> Any:
  """One (typed) value or list item, converted to the field's kind."""
  kind = spec.kind
  if kind == "bool":
    if not isinstance(value, bool):
      raise ValueError(f"{where}={value!r} must be True or False")
  elif kind == "int":
    if isinstance(value, bool) or not isinstance(value, int):
      raise ValueError(f"{where}={value!r} must be an integer")
    value = int(value)
  elif kind == "float":
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ValueError(f"{where}={value!r} must be a number")
    value = float(value)
    if not math.isfinite(value):
      raise ValueError(f"{where}={value!r} must be finite")
  elif not isinstance(value, str):
    raise ValueError(f"{where}={value!r} must be a string")
  if spec.choices is not None and value not in spec.choices:
    raise ValueError(f"{where}={value!r} must be one of "
                     f"{', '.join(map(str, spec.choices))}")
  if spec.check is not None and not spec.check[0](value):
    raise ValueError(f"{where}={value!r} must be {spec.check[1]}")
  return value


def coerce(spec: FieldSpec, value: Any, where: str) -> Any:
  """A typed value (config / Python) -> the field's value; ValueError naming ``where``.

  Integers are accepted for floats and lists for tuples; nothing else is
  converted (no strings for numbers, no 0/1 for booleans).
  """
  if value is None:
    if spec.optional:
      return None
    raise ValueError(f"{where}=None must be {spec.type_text()}")
  if not spec.is_list:
    return _item(spec, value, where)
  if not isinstance(value, (list, tuple)) or not value:
    raise ValueError(f"{where}={value!r} must be {spec.type_text()}")
  items = tuple(_item(spec, v, f"{where}[{i}]") for i, v in enumerate(value))
  if len(set(items)) != len(items):
    raise ValueError(f"{where} lists a value twice: {list(value)}")
  return items


def check(spec: FieldSpec, value: Any, where: str) -> None:
  """Raises ValueError when a stored value is not exactly of the field's type."""
  converted = coerce(spec, value, where)
  if type(converted) is not type(value) or converted != value:
    raise ValueError(f"{where}={value!r} must be {spec.type_text()}"
                     + (" (a tuple)" if spec.is_list else ""))


def _parse_item(spec: FieldSpec, text: str, where: str) -> Any:
  if spec.kind == "int":
    return _parse.parse_int(text, where)
  if spec.kind == "float":
    return _parse.parse_float(text, where, finite=False)
  if spec.kind == "bool":
    return _parse.parse_bool(text, where)
  return str(text).strip()


def parse(spec: FieldSpec, value: Any, where: str) -> Any:
  """A command-line value (absl's: a string, a number, a bool, a list of strings)
  -> the field's typed value; list items are parsed from strings once."""
  if value is None:
    return coerce(spec, value, where)
  if spec.is_list:
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [_parse_item(spec, v, where) if isinstance(v, str) else v for v in items]
    return coerce(spec, items, where)
  if isinstance(value, str) and spec.kind != "str":
    value = _parse_item(spec, value, where)
  if spec.kind == "float" and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  return coerce(spec, value, where)


def to_text(spec: FieldSpec, value: Any) -> str:
  """A value as the command line writes it (``parse`` reads it back)."""
  if value is None:
    return ""
  items = value if spec.is_list else (value,)
  out = []
  for v in items:
    if spec.kind == "bool":
      out.append("true" if v else "false")
    elif spec.kind == "float":
      # 0.0 -> "0" (as the flags' defaults were written), else exact repr.
      out.append(str(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v))
    else:
      out.append(str(v))
  return ",".join(out)
